// v1.2 adds the edge's training loss to Backward (field 6, a double). Its golden sample is kept
// forever; a v1.0 Backward still decodes, with no loss at all.
import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import { decodeEnvelope, decodeTensor, encodeEnvelope } from '../../protocol/index.ts';
import type { Backward } from '../../protocol/index.ts';

const read = (dir: string, name: string): Uint8Array => new Uint8Array(readFileSync(new URL(`../fixtures/protocol/${dir}/${name}.bin`, import.meta.url)));

test('the v1.2 backward decodes to its loss, bit for bit, beside the v1 fields', () => {
  const e = decodeEnvelope(read('v1.2-loss', 'backward'));
  assert.deepEqual(e.version, { major: 1, minor: 2 });
  assert.equal(e.requestId, 'req-0004');
  assert.equal(e.body.case, 'backward');
  const b = e.body.value as Backward;
  assert.equal(b.loss, 2.718281828459045);
  assert.deepEqual([b.sessionId, b.step, b.microbatch, b.frames.length], ['sess-0001', 12, 3, 2]);
  const v1 = decodeEnvelope(read('v1', 'backward')).body.value as Backward;
  assert.deepEqual(b.frames.map((f) => [...decodeTensor(f)]), v1.frames.map((f) => [...decodeTensor(f)]));
});

test('a v1.0 backward carries no loss field at all, and a loss of 0 reads as not reported', () => {
  const v1 = decodeEnvelope(read('v1', 'backward')).body.value as Backward;
  assert.equal('loss' in v1, false);
  const zero = encodeEnvelope({ version: { major: 1, minor: 0 }, requestId: 'req-0004', body: { case: 'backward', value: { ...v1, loss: 0 } } });
  assert.deepEqual(zero, read('v1', 'backward'), 'a zero loss is not written: the bytes are v1.0\'s');
  assert.equal('loss' in (decodeEnvelope(zero).body.value as Backward), false);
});

test('a loss survives an encode and decode round trip as a double, negative values included', () => {
  const v1 = decodeEnvelope(read('v1', 'backward')).body.value as Backward;
  for (const loss of [1e-300, -0.125, 123456.789012345]) {
    const bytes = encodeEnvelope({ version: { major: 1, minor: 2 }, requestId: 'r', body: { case: 'backward', value: { ...v1, loss } } });
    assert.equal((decodeEnvelope(bytes).body.value as Backward).loss, loss);
  }
});
