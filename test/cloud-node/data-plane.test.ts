import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { LlamaModel, loadModelFolder, tf } from '../../model/index.ts';
import { decodeEnvelope, decodeTensor, encodeEnvelope, envelope, splitMessage } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import {
  HIDDEN, STORIES_DIR, TestClient, assertError, createTenantKey, frameOf, helloBody, metric, randomTensor, startTestNode,
} from './helpers.ts';
import type { TestNode } from './helpers.ts';

let node: TestNode;
let aliceKey: string;
let bobKey: string;
/** Bob trains alongside every bad-input test and must never notice. */
let bob: TestClient;
let bobStep = 0;

async function bobKeepsWorking(): Promise<void> {
  const g = await bob.step(bobStep++);
  assert.equal(g.length, 8 * HIDDEN);
}

before(async () => {
  node = await startTestNode();
  aliceKey = await createTenantKey(node, 'alice');
  bobKey = await createTenantKey(node, 'bob');
  bob = await TestClient.connect(node, bobKey);
  await bob.hello();
});

async function aliceSession(): Promise<TestClient> {
  const alice = await TestClient.connect(node, aliceKey);
  await alice.hello();
  return alice;
}

describe('the middle executor', () => {
  it('returns h_M and g_B equal to model.blocks(B, L-T) and its tf.grads computed locally (f32, within 1e-6)', async () => {
    const alice = await aliceSession();
    const loaded = await loadModelFolder(STORIES_DIR);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const shape: [number, number, number] = [2, 7, HIDDEN];
    const h = randomTensor(shape, 11);
    const g = randomTensor(shape, 12);
    try {
      const fwd = await alice.request(alice.forwardBody(0, 0, [frameOf(h, shape)]));
      assert.equal(fwd.body.case, 'forwardResult');
      const bwd = await alice.request(alice.backwardBody(0, 0, [frameOf(g, shape)]));
      assert.equal(bwd.body.case, 'backwardResult');
      if (fwd.body.case !== 'forwardResult' || bwd.body.case !== 'backwardResult') return;
      assert.equal(bwd.body.value.recomputed, false);
      const [expectedH, expectedG] = tf.tidy(() => {
        const x = tf.tensor3d(h, shape);
        const y = model.blocks(x, 2, 3);
        const [dx] = tf.grads((t: tf.Tensor) => model.blocks(t as tf.Tensor3D, 2, 3))([x], tf.tensor3d(g, shape));
        return [y.dataSync() as Float32Array, dx.dataSync() as Float32Array];
      });
      const gotH = decodeTensor(fwd.body.value.frames[0]);
      const gotG = decodeTensor(bwd.body.value.frames[0]);
      assert.deepEqual(fwd.body.value.frames[0].shape, shape);
      assert.deepEqual(bwd.body.value.frames[0].shape, shape);
      for (let i = 0; i < expectedH.length; i++) assert.ok(Math.abs(gotH[i] - expectedH[i]) <= 1e-6, `h_M[${i}]: ${gotH[i]} vs ${expectedH[i]}`);
      for (let i = 0; i < expectedG.length; i++) assert.ok(Math.abs(gotG[i] - expectedG[i]) <= 1e-6, `g_B[${i}]: ${gotG[i]} vs ${expectedG[i]}`);
      assert.ok(expectedG.some((v) => v !== 0), 'the gradient is not trivially zero');
    } finally {
      model.dispose();
    }
  });

  it('chunks a request larger than the message limit and a reply larger than it, both ways', async () => {
    const alice = await aliceSession();
    const shape: [number, number, number] = [2, 64, HIDDEN]; // 32 KiB per frame, limit 16 KiB
    const fwd = await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor(shape, 3), shape)]));
    assert.equal(fwd.body.case, 'forwardResult');
    const bwd = await alice.request(alice.backwardBody(0, 0, [frameOf(randomTensor(shape, 4), shape)]));
    assert.equal(bwd.body.case, 'backwardResult');
    await bobKeepsWorking();
  });

  it('uses the negotiated codecs: int8 activations, top-k gradients with error feedback', async () => {
    const alice = await TestClient.connect(node, aliceKey);
    const welcome = await alice.hello({ codecs: { forward: [{ codec: 'int8-block', blockSize: 64 }, { codec: 'f32' }], backward: [{ codec: 'topk', topkFraction: 0.25, topkValues: 'f16' }] } });
    assert.equal(welcome.codecs.forward.codec, 'int8-block');
    assert.equal(welcome.codecs.backward.codec, 'topk');
    const shape: [number, number, number] = [1, 8, HIDDEN];
    const before = await metric(node, 'tandem_frame_bytes_total{direction="out",codec="topk"}');
    const fwd = await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor(shape, 5), shape, { codec: 'int8-block' })]));
    assert.equal(fwd.body.case === 'forwardResult' && fwd.body.value.frames[0].codec, 'int8-block');
    const bwd = await alice.request(alice.backwardBody(0, 0, [frameOf(randomTensor(shape, 6), shape)]));
    assert.equal(bwd.body.case === 'backwardResult' && bwd.body.value.frames[0].codec, 'topk');
    assert.ok((await metric(node, 'tandem_frame_bytes_total{direction="out",codec="topk"}')) > before);
  });
});

describe('idempotency', () => {
  it('answers the same Forward and Backward twice with identical bytes, computed and counted once', async () => {
    const alice = await aliceSession();
    const shape: [number, number, number] = [1, 5, HIDDEN];
    const forward = encodeEnvelope(envelope('fwd-1', alice.forwardBody(0, 0, [frameOf(randomTensor(shape, 7), shape)])));
    const backward = encodeEnvelope(envelope('bwd-1', alice.backwardBody(0, 0, [frameOf(randomTensor(shape, 8), shape)])));
    const steps = async (kind: string): Promise<number> => metric(node, `tandem_steps_total{kind="${kind}"}`);
    const f0 = await steps('forward');
    const b0 = await steps('backward');
    const first = await alice.requestBytes(forward, 'fwd-1');
    const again = await alice.requestBytes(forward, 'fwd-1');
    assert.deepEqual(again.bytes, first.bytes);
    const back1 = await alice.requestBytes(backward, 'bwd-1');
    const back2 = await alice.requestBytes(backward, 'bwd-1');
    assert.equal(back1.reply.body.case, 'backwardResult');
    assert.deepEqual(back2.bytes, back1.bytes);
    assert.equal(await steps('forward'), f0 + 1);
    assert.equal(await steps('backward'), b0 + 1);
    // The session's steps are counted once; bob's steps ran in other tests, not in between.
    assert.ok((await metric(node, 'tandem_step_replays_total{kind="forward"}')) >= 1);
  });

  it('refuses a Forward for a step older than the last one unless it is a retry of a kept reply', async () => {
    const alice = await aliceSession();
    const shape: [number, number, number] = [1, 4, HIDDEN];
    const h = frameOf(randomTensor(shape, 9), shape);
    assert.equal((await alice.request(alice.forwardBody(1, 0, [h]), 'f-1')).body.case, 'forwardResult');
    assert.equal((await alice.request(alice.forwardBody(3, 0, [h]), 'f-3')).body.case, 'forwardResult');
    assertError(await alice.request(alice.forwardBody(1, 1, [h])), 'TANDEM_STEP_STALE');
    // Step 3's reply is kept: a retry under another request id gets it, under that id.
    const retry = await alice.request(alice.forwardBody(3, 0, [h]), 'f-3-retry');
    assert.equal(retry.body.case, 'forwardResult');
    assert.equal(retry.requestId, 'f-3-retry');
    await bobKeepsWorking();
  });
});

describe('bad input gets a typed error; the node and other sessions carry on', () => {
  const shape: [number, number, number] = [1, 4, HIDDEN];

  it('an unknown session', async () => {
    const alice = await aliceSession();
    assertError(await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)], true, 'no-such-session')), 'TANDEM_SESSION_UNKNOWN');
    assertError(await alice.request({ case: 'sessionOpen', value: { sessionId: 'no-such-session', resumeStep: 0 } }), 'TANDEM_SESSION_UNKNOWN');
    await alice.step(0);
    await bobKeepsWorking();
  });

  it('a closed session', async () => {
    const alice = await aliceSession();
    await alice.step(0);
    const closed = await alice.request({ case: 'sessionClose', value: { sessionId: alice.sessionId, reason: 'completed', message: '' } });
    assert.equal(closed.body.case, 'sessionClose');
    assertError(await alice.request(alice.forwardBody(1, 0, [frameOf(randomTensor(shape, 1), shape)])), 'TANDEM_SESSION_CLOSED');
    assertError(await alice.request({ case: 'sessionOpen', value: { sessionId: alice.sessionId, resumeStep: 1 } }), 'TANDEM_SESSION_CLOSED');
    await bobKeepsWorking();
  });

  it('a wrong key: the socket connection is refused with TANDEM_AUTH_KEY_INVALID', async () => {
    await assert.rejects(TestClient.connect(node, 'tdk_not-a-key'), (err: Error & { data?: { code?: string } }) => {
      assert.equal(err.data?.code, 'TANDEM_AUTH_KEY_INVALID');
      return true;
    });
    await assert.rejects(TestClient.connect(node, ''), (err: Error & { data?: { code?: string } }) => err.data?.code === 'TANDEM_AUTH_KEY_MISSING');
    await bobKeepsWorking();
  });

  it("another tenant's session is unknown to it", async () => {
    const alice = await aliceSession();
    const h = frameOf(randomTensor(shape, 1), shape);
    assertError(await alice.request(alice.forwardBody(0, 0, [h], true, bob.sessionId)), 'TANDEM_SESSION_UNKNOWN');
    assertError(await alice.request({ case: 'sessionOpen', value: { sessionId: bob.sessionId, resumeStep: 0 } }), 'TANDEM_SESSION_UNKNOWN');
    assertError(await alice.request({ case: 'sessionClose', value: { sessionId: bob.sessionId, reason: 'cancelled', message: '' } }), 'TANDEM_SESSION_UNKNOWN');
    await bobKeepsWorking();
  });

  it('a wrong shape: hidden size, rank, and a g_M unlike its h_B', async () => {
    const alice = await aliceSession();
    assertError(await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor([1, 4, 32], 1), [1, 4, 32])])), 'TANDEM_SHAPE_MISMATCH');
    assertError(await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor([4, HIDDEN], 1), [4, HIDDEN])])), 'TANDEM_SHAPE_MISMATCH');
    assert.equal((await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)]))).body.case, 'forwardResult');
    assertError(await alice.request(alice.backwardBody(0, 0, [frameOf(randomTensor([1, 5, HIDDEN], 2), [1, 5, HIDDEN])])), 'TANDEM_SHAPE_MISMATCH');
    assertError(await alice.request(alice.forwardBody(0, 1, [])), 'TANDEM_FRAME_COUNT_INVALID');
    // The session itself is fine: its backward still runs.
    assert.equal((await alice.request(alice.backwardBody(0, 0, [frameOf(randomTensor(shape, 2), shape)]))).body.case, 'backwardResult');
    await bobKeepsWorking();
  });

  it('a NaN in h_B', async () => {
    const alice = await aliceSession();
    const h = randomTensor(shape, 1);
    h[17] = Number.NaN;
    assertError(await alice.request(alice.forwardBody(0, 0, [frameOf(h, shape)])), 'TANDEM_PROTO_FRAME_NON_FINITE');
    await alice.step(0);
    await bobKeepsWorking();
  });

  it('an oversized frame, and an oversized unchunked message', async () => {
    const alice = await aliceSession();
    const big: [number, number, number] = [1, 300, HIDDEN]; // 76,800 bytes > maxFrameBytes 65,536
    assertError(await alice.request(alice.forwardBody(0, 0, [frameOf(randomTensor(big, 1), big)])), 'TANDEM_PROTO_FRAME_TOO_LARGE');
    const medium: [number, number, number] = [1, 100, HIDDEN]; // 25,600 bytes > maxMessageBytes 16,384, sent whole
    const ack = await alice.sendRaw(encodeEnvelope(envelope('whole', alice.forwardBody(0, 0, [frameOf(randomTensor(medium, 1), medium)]))));
    assertError(decodeEnvelope(ack as Uint8Array), 'TANDEM_PROTO_MESSAGE_TOO_LARGE');
    await alice.step(0);
    await bobKeepsWorking();
  });

  it('a bad checksum', async () => {
    const alice = await aliceSession();
    const frame = frameOf(randomTensor(shape, 1), shape);
    frame.crc32 = (frame.crc32 ^ 1) >>> 0;
    assertError(await alice.request(alice.forwardBody(0, 0, [frame])), 'TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH');
    await alice.step(0);
    await bobKeepsWorking();
  });

  it('a protocol version mismatch: another major envelope, and a Hello range without a common version', async () => {
    const alice = await TestClient.connect(node, aliceKey);
    const future: Envelope = { version: { major: 2, minor: 0 }, requestId: 'v2', body: helloBody({ versions: { min: { major: 2, minor: 0 }, max: { major: 2, minor: 3 } } }) };
    const ack = await alice.sendRaw(encodeEnvelope(future));
    const reply = decodeEnvelope(ack as Uint8Array);
    assertError(reply, 'TANDEM_PROTO_VERSION_UNSUPPORTED');
    assert.equal(reply.body.case === 'error' && reply.body.value.details.theirs, '[2.0, 2.3]');
    assertError(await alice.request(helloBody({ versions: { min: { major: 0, minor: 1 }, max: { major: 0, minor: 9 } } })), 'TANDEM_PROTO_VERSION_UNSUPPORTED');
    await alice.hello();
    await alice.step(0);
    await bobKeepsWorking();
  });

  it('garbage bytes, a message the cloud does not take, an unknown model, a bad cut', async () => {
    const alice = await TestClient.connect(node, aliceKey);
    assertError(decodeEnvelope((await alice.sendRaw(new Uint8Array([0x0a, 0xff, 0xff, 0xff]))) as Uint8Array), 'TANDEM_PROTO_MESSAGE_MALFORMED');
    assertError(await alice.request({ case: 'forwardResult', value: { sessionId: '', step: 0, microbatch: 0, frames: [] } }), 'TANDEM_MESSAGE_UNEXPECTED');
    assertError(await alice.request(helloBody({ model: { id: 'gpt-9', contentHash: '' } })), 'TANDEM_MODEL_UNKNOWN');
    assertError(await alice.request(helloBody({ model: { id: 'stories260K', contentHash: 'sha256:00' } })), 'TANDEM_MODEL_MISMATCH');
    assertError(await alice.request(helloBody({ cut: { bottom: 2, top: 3 } })), 'TANDEM_CUT_INVALID');
    assertError(await alice.request(helloBody({ codecs: { forward: [{ codec: 'f32' }], backward: [] }, cut: { bottom: 1, top: 0 } })), 'TANDEM_CUT_INVALID');
    const welcome = await alice.hello({ cut: { bottom: 0, top: 0 } });
    assert.deepEqual(welcome.cut, { bottom: 2, top: 2 }, 'a Hello without a cut gets the default');
    await bobKeepsWorking();
  });

  it('a client that vanishes mid-step: the half-sent stream is dropped, the session reattaches and the step completes', async () => {
    const alice = await aliceSession();
    const sessionId = alice.sessionId;
    const big: [number, number, number] = [1, 128, HIDDEN]; // 32 KiB: two or more chunks
    const frame = frameOf(randomTensor(big, 21), big);
    const request = encodeEnvelope(envelope('vanish-1', alice.forwardBody(0, 0, [frame])));
    const chunks = splitMessage(request, 'vanish-1', alice.maxMessageBytes);
    assert.ok(chunks.length >= 2);
    assert.equal(await alice.sendRaw(chunks[0]), null, 'an accepted chunk is acked with null');
    alice.close();
    // Another request in flight when the client goes: computed once, kept for the retry.
    const leaving = await TestClient.connect(node, aliceKey);
    leaving.sessionId = sessionId;
    const small: [number, number, number] = [1, 4, HIDDEN];
    const computed = await metric(node, 'tandem_steps_total{kind="forward"}');
    const received = await metric(node, 'tandem_message_bytes_total{direction="in"}');
    leaving.socket.emit('envelope', encodeEnvelope(envelope('gone', leaving.forwardBody(0, 1, [frameOf(randomTensor(small, 22), small)]))), () => undefined);
    // Leave as soon as the node has the request, before its reply can arrive.
    while ((await metric(node, 'tandem_message_bytes_total{direction="in"}')) === received) await new Promise((resolve) => setTimeout(resolve, 1));
    leaving.close();
    await bobKeepsWorking();

    const back = await TestClient.connect(node, aliceKey);
    assertError(decodeEnvelope((await back.sendRaw(chunks[1])) as Uint8Array), 'TANDEM_PROTO_CHUNK_OUT_OF_ORDER');
    const welcome = await back.request({ case: 'sessionOpen', value: { sessionId, resumeStep: 0 } });
    assert.equal(welcome.body.case, 'welcome');
    back.sessionId = sessionId;
    const replays = await metric(node, 'tandem_step_replays_total{kind="forward"}');
    const retried = await back.request(back.forwardBody(0, 1, [frameOf(randomTensor(small, 22), small)]));
    assert.equal(retried.body.case, 'forwardResult');
    // Computed once while its client was gone (plus bob's step), answered from the reply cache now.
    assert.equal(await metric(node, 'tandem_steps_total{kind="forward"}'), computed + 2);
    assert.equal(await metric(node, 'tandem_step_replays_total{kind="forward"}'), replays + 1);
    const full = await back.requestBytes(request, 'vanish-1');
    assert.equal(full.reply.body.case, 'forwardResult');
    await bobKeepsWorking();
  });

  it('heartbeats echo the sequence; a heartbeat for an unknown session is an error', async () => {
    const alice = await aliceSession();
    const beat = await alice.request({ case: 'heartbeat', value: { sessionId: alice.sessionId, sequence: 7, sentAtMs: 1 } });
    assert.equal(beat.body.case === 'heartbeat' && beat.body.value.sequence, 7);
    assertError(await alice.request({ case: 'heartbeat', value: { sessionId: 'nope', sequence: 1, sentAtMs: 1 } }), 'TANDEM_SESSION_UNKNOWN');
    await bobKeepsWorking();
  });
});
