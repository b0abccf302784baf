// Found by the fuzzing of stop 33: one Forward whose top-k frame kept no value (k = 0: no
// payload, no indices) made every frame of every tenant fail TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH
// until the node restarted. Decoding it read the buffer of the empty array that every absent
// bytes field shares; Node's zlib.crc32 then answers 0 for that array whatever CRC it continues,
// and f32 frames carry it as their indices. The CRC of no bytes now continues the CRC unchanged.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import type { TensorFrame } from '../../protocol/index.ts';
import { HIDDEN, TestClient, createTenantKey, frameOf, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let attacker: TestClient;

before(async () => {
  node = await startTestNode();
  good = await bystander(node);
  attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
  await attacker.hello({ codecs: { forward: [{ codec: 'topk', topkFraction: 0.01, topkValues: 'f16' }, { codec: 'f32' }], backward: [{ codec: 'f32' }] } });
});

/** A top-k frame of [1, 8, HIDDEN] that keeps no value: all zeros, its checksum that of no bytes. */
function emptyTopk(): TensorFrame {
  const frame = frameOf(randomTensor([1, 8, HIDDEN], 3), [1, 8, HIDDEN], { codec: 'topk', topkFraction: 0.01, topkValues: 'f16' });
  return { ...frame, params: { ...frame.params, k: 0, indices: new Uint8Array(0), scales: new Uint8Array(0) }, payload: new Uint8Array(0), crc32: 0 };
}

describe('a top-k frame that keeps no value', () => {
  it('is computed as zeros, and every tenant\'s frames after it still check', async () => {
    for (let i = 0; i < 3; i++) {
      const reply = await survives(node, good, () => attacker.request(attacker.forwardBody(i, 0, [emptyTopk()], false)));
      assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value));
    }
    // The attacker's own f32 frames check too.
    const own = await attacker.request(attacker.forwardBody(9, 0, [frameOf(randomTensor([1, 8, HIDDEN], 4), [1, 8, HIDDEN])], false));
    assert.equal(own.body.case, 'forwardResult', JSON.stringify(own.body.value));
  });
});
