// Finding 3 of issue 9 (and the top-k half of finding 2): an 84-byte top-k frame could declare
// a [2048, 512, 64] activation and buy seconds of compute (and gigabytes) on the event loop.
// The declared shape is now checked against the session's shape limits before the frame is
// validated, decoded or computed on.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { encodeEnvelope, envelope } from '../../protocol/index.ts';
import type { Envelope, TensorFrame } from '../../protocol/index.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let attacker: TestClient;
const MAX_TOKENS = 256;

before(async () => {
  node = await startTestNode({ maxMicrobatchTokens: MAX_TOKENS });
  good = await bystander(node);
  attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
  await attacker.hello({ codecs: { forward: [{ codec: 'topk', topkFraction: 0.01, topkValues: 'f16' }], backward: [{ codec: 'f32' }] } });
});

/** A valid top-k frame of one token whose declared shape is then inflated. */
function inflatedTopk(shape: number[]): TensorFrame {
  const frame = frameOf(randomTensor([1, 1, HIDDEN], 5), [1, 1, HIDDEN], { codec: 'topk', topkFraction: 0.01, topkValues: 'f16' });
  return { ...frame, shape };
}

function details(reply: Envelope): Record<string, string> {
  return reply.body.case === 'error' ? reply.body.value.details : {};
}

describe('finding 3: the declared shape of a frame is bounded before any work', () => {
  it('an 84-byte top-k Forward declaring [2048, 512, 64] gets TANDEM_MICROBATCH_TOO_LARGE, and 50 more in a row change nothing', async () => {
    const body = attacker.forwardBody(0, 0, [inflatedTopk([2048, 512, HIDDEN])]);
    const bytes = encodeEnvelope(envelope('attack-0', body));
    assert.ok(bytes.length < 120, `the attack is ${bytes.length} bytes`);
    const replies = await survives(node, good, async () => {
      const out: Envelope[] = [];
      for (let i = 0; i < 50; i++) out.push(await attacker.request(attacker.forwardBody(i, 0, [inflatedTopk([2048, 512, HIDDEN])])));
      return out;
    });
    for (const reply of replies) {
      assertError(reply, 'TANDEM_MICROBATCH_TOO_LARGE');
      assert.deepEqual({ actual: details(reply).actual, limit: details(reply).limit }, { actual: String(2048 * 512), limit: String(MAX_TOKENS) });
    }
    const beat = await good.client.request({ case: 'heartbeat', value: { sessionId: good.client.sessionId, sequence: 1, sentAtMs: Date.now() } });
    assert.equal(beat.body.case, 'heartbeat');
  });

  it('a sequence longer than the model\'s context gets TANDEM_SHAPE_MISMATCH naming the context', async () => {
    const reply = await survives(node, good, () => attacker.request(attacker.forwardBody(60, 0, [inflatedTopk([1, 513, HIDDEN])])));
    assertError(reply, 'TANDEM_SHAPE_MISMATCH');
    assert.match(details(reply).expected, /seq <= 512/);
  });

  it('a Backward declaring a huge g_M is refused the same way, and a micro-batch at the limit is computed', async () => {
    const reply = await survives(node, good, () => attacker.request(attacker.backwardBody(61, 0, [inflatedTopk([64, 512, HIDDEN]), inflatedTopk([64, 512, HIDDEN])])));
    assertError(reply, 'TANDEM_MICROBATCH_TOO_LARGE');
    const atLimit: [number, number, number] = [2, MAX_TOKENS / 2, HIDDEN];
    const fwd = await attacker.request(attacker.forwardBody(62, 0, [frameOf(randomTensor(atLimit, 7), atLimit, { codec: 'topk', topkFraction: 0.5, topkValues: 'f16' })], false));
    assert.equal(fwd.body.case, 'forwardResult', JSON.stringify(fwd.body.value));
  });

  it('the Welcome states the element limit a micro-batch implies', () => {
    assert.equal(attacker.welcome?.limits.maxElements, MAX_TOKENS * HIDDEN);
  });
});

// Found by the fuzzing of stop 33: one Forward whose top-k frame kept no value (k = 0: no
// payload, no indices) made every frame of every tenant fail TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH
// until the node restarted. Decoding it read the buffer of the empty array that every absent
// bytes field shares; Node's zlib.crc32 then answers 0 for that array whatever CRC it continues,
// and f32 frames carry it as their indices. The CRC of no bytes now continues the CRC unchanged.
describe('a top-k frame that keeps no value', () => {
  /** A top-k frame of [1, 8, HIDDEN] that keeps no value: all zeros, its checksum that of no bytes. */
  function emptyTopk(): TensorFrame {
    const frame = frameOf(randomTensor([1, 8, HIDDEN], 3), [1, 8, HIDDEN], { codec: 'topk', topkFraction: 0.01, topkValues: 'f16' });
    return { ...frame, params: { ...frame.params, k: 0, indices: new Uint8Array(0), scales: new Uint8Array(0) }, payload: new Uint8Array(0), crc32: 0 };
  }

  it("is computed as zeros, and every other tenant's f32 frames after it still check", async () => {
    for (let i = 0; i < 3; i++) {
      const reply = await survives(node, good, () => attacker.request(attacker.forwardBody(70 + i, 0, [emptyTopk()], false)));
      assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value));
    }
  });
});
