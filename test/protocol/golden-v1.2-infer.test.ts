// v1.2 adds split inference: InferStep (h_B of new tokens at a position), InferStepResult
// (their h_M) and InferEnd. Its golden samples are kept forever.
import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import { decodeEnvelope, decodeTensor, encodeEnvelope } from '../../protocol/index.ts';
import type { InferStep } from '../../protocol/index.ts';

const read = (name: string): Uint8Array => new Uint8Array(readFileSync(new URL(`../fixtures/protocol/v1.2-infer/${name}.bin`, import.meta.url)));
const values = Array.from({ length: 12 }, (_, i) => (i - 6) / 8);

test('v1.2 InferStep and InferStepResult decode to their session, position and frames', () => {
  for (const [name, kind, frameName, codec] of [['infer-step', 'inferStep', 'h_B', 'f32'], ['infer-step-result', 'inferStepResult', 'h_M', 'f16']] as const) {
    const e = decodeEnvelope(read(name));
    assert.deepEqual(e.version, { major: 1, minor: 2 });
    assert.equal(e.requestId, 'req-0101');
    assert.equal(e.body.case, kind);
    const v = e.body.value as InferStep;
    assert.equal(v.sessionId, 'sess-0001');
    assert.equal(v.position, 7);
    assert.equal(v.frames.length, 1);
    assert.deepEqual([v.frames[0].name, v.frames[0].codec, v.frames[0].shape], [frameName, codec, [1, 3, 4]]);
    assert.deepEqual(Array.from(decodeTensor(v.frames[0])), values);
    // Re-encoding gives the same bytes: nothing is lost or added in decoding.
    assert.deepEqual(encodeEnvelope(e), read(name));
  }
});

test('v1.2 InferEnd decodes to its session', () => {
  const e = decodeEnvelope(read('infer-end'));
  assert.deepEqual(e.body, { case: 'inferEnd', value: { sessionId: 'sess-0001' } });
});
