import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { decodeTensor } from '../../protocol/index.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';

const shape: [number, number, number] = [1, 8, HIDDEN];
const h = randomTensor(shape, 31);
const g = randomTensor(shape, 32);

/** Forward then Backward of the same (h_B, g_M); returns the BackwardResult, asking for h_B again when the cloud lost it. */
async function stepOn(node: TestNode): Promise<{ gB: Float32Array; recomputed: boolean; askedForH: boolean }> {
  const client = await TestClient.connect(node, await createTenantKey(node, `t${Math.random().toString(36).slice(2, 8)}`));
  await client.hello();
  assert.equal((await client.request(client.forwardBody(0, 0, [frameOf(h, shape)]))).body.case, 'forwardResult');
  // Let a time limit of 1 ms pass; a no-op for the other nodes.
  await new Promise((resolve) => setTimeout(resolve, 20));
  let reply = await client.request(client.backwardBody(0, 0, [frameOf(g, shape)]));
  let askedForH = false;
  if (reply.body.case === 'error') {
    assertError(reply, 'TANDEM_ACTIVATIONS_GONE');
    askedForH = true;
    reply = await client.request(client.backwardBody(0, 0, [frameOf(g, shape), frameOf(h, shape)]));
  }
  assert.equal(reply.body.case, 'backwardResult', JSON.stringify(reply.body.value));
  if (reply.body.case !== 'backwardResult') throw new Error('unreachable');
  return { gB: decodeTensor(reply.body.value.frames[0]), recomputed: reply.body.value.recomputed, askedForH };
}

describe('the activation cache', () => {
  let roomy: TestNode;
  let tiny: TestNode;
  let brief: TestNode;

  before(async () => {
    [roomy, tiny, brief] = await Promise.all([
      startTestNode(),
      startTestNode({ memoryBudgetBytes: 1024 }), // h_B is 2 KiB: never kept
      startTestNode({ activationTtlMs: 1 }),
    ]);
  });

  it('evicted by a tiny memory budget: backward asks for h_B, and the recomputed g_B equals the kept one exactly', async () => {
    const kept = await stepOn(roomy);
    assert.equal(kept.askedForH, false);
    assert.equal(kept.recomputed, false);
    const evicted = await stepOn(tiny);
    assert.equal(evicted.askedForH, true);
    assert.equal(evicted.recomputed, true);
    assert.deepEqual(evicted.gB, kept.gB);
    assert.equal(await metric(tiny, 'tandem_activation_evictions_total{reason="budget"}'), 1);
    assert.equal(await metric(tiny, 'tandem_recomputes_total'), 1);
    assert.equal(await metric(roomy, 'tandem_recomputes_total'), 0);
  });

  it('expired by the time limit: the same, counted as a ttl eviction', async () => {
    const kept = await stepOn(roomy);
    const expired = await stepOn(brief);
    assert.equal(expired.askedForH, true);
    assert.equal(expired.recomputed, true);
    assert.deepEqual(expired.gB, kept.gB);
    assert.equal(await metric(brief, 'tandem_activation_evictions_total{reason="ttl"}'), 1);
  });

  it('holds activations until their backward and reports their bytes; the budget evicts the oldest first', async () => {
    const node = await startTestNode({ memoryBudgetBytes: 5 * 1024 }); // room for two 2 KiB activations
    const client = await TestClient.connect(node, await createTenantKey(node, 'carol'));
    await client.hello();
    for (let mb = 0; mb < 3; mb++) {
      assert.equal((await client.request(client.forwardBody(0, mb, [frameOf(h, shape)]))).body.case, 'forwardResult');
    }
    assert.equal(await metric(node, 'tandem_activation_cache_bytes'), 2 * h.byteLength);
    assert.equal(await metric(node, 'tandem_activation_evictions_total{reason="budget"}'), 1);
    assertError(await client.request(client.backwardBody(0, 0, [frameOf(g, shape)])), 'TANDEM_ACTIVATIONS_GONE');
    for (const mb of [1, 2]) {
      const reply = await client.request(client.backwardBody(0, mb, [frameOf(g, shape)]));
      assert.equal(reply.body.case === 'backwardResult' && reply.body.value.recomputed, false);
    }
    assert.equal(await metric(node, 'tandem_activation_cache_bytes'), 0);
    // A Forward that needs no backward keeps nothing.
    assert.equal((await client.request(client.forwardBody(1, 0, [frameOf(h, shape)], false))).body.case, 'forwardResult');
    assert.equal(await metric(node, 'tandem_activation_cache_bytes'), 0);
  });

  it('keeps nothing for the Forwards of a session closed while they compute (found by fuzzing)', async () => {
    const node = await startTestNode();
    const client = await TestClient.connect(node, await createTenantKey(node, 'dave'));
    await client.hello();
    // The close arrives while the Forwards are with the compute workers.
    const forwards = Array.from({ length: 8 }, (_, mb) => client.request(client.forwardBody(0, mb, [frameOf(h, shape)])));
    const closed = await client.request({ case: 'sessionClose', value: { sessionId: client.sessionId, reason: 'completed', message: '' } });
    assert.equal(closed.body.case, 'sessionClose');
    await Promise.all(forwards);
    assert.equal(await metric(node, 'tandem_sessions_open'), 0);
    assert.equal(await metric(node, 'tandem_activation_cache_bytes'), 0, 'no activation of the closed session is kept');
  });
});
