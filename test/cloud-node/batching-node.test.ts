// Batching through a node (issue 13): `batching` options reach the executor, concurrent
// sessions of different tenants share one backbone call over the data plane, each gets what
// a node without batching answers, and the batch metrics count it.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { decodeTensor } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import { HIDDEN, TestClient, createTenantKey, frameOf, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';

let batched: TestNode;
let plain: TestNode;
before(async () => {
  [batched, plain] = await Promise.all([
    startTestNode({ batching: { windowMs: 300, maxTokens: 1024 } }),
    startTestNode({ batching: { maxTokens: 1 } }),
  ]);
});

const shapes: [number, number, number][] = [[1, 8, HIDDEN], [2, 5, HIDDEN], [1, 11, HIDDEN]];

async function clients(node: TestNode): Promise<TestClient[]> {
  return Promise.all(shapes.map(async (_, i) => {
    const client = await TestClient.connect(node, await createTenantKey(node, `tenant${i}`));
    await client.hello();
    return client;
  }));
}

function frames(reply: Envelope): Float32Array {
  assert.ok(reply.body.case === 'forwardResult' || reply.body.case === 'backwardResult', JSON.stringify(reply.body.value));
  return decodeTensor(reply.body.value.frames[0]);
}

describe('batching through a node', () => {
  it('three tenants\' Forwards and Backwards are one batch each and equal an unbatched node\'s answers', async () => {
    const [mine, theirs] = await Promise.all([clients(batched), clients(plain)]);
    const h = shapes.map((s, i) => randomTensor(s, 10 + i));
    const g = shapes.map((s, i) => randomTensor(s, 20 + i));
    const step = (cs: TestClient[]) => Promise.all(cs.map(async (c, i) => {
      const hM = frames(await c.request(c.forwardBody(0, 0, [frameOf(h[i], shapes[i])])));
      const gB = frames(await c.request(c.backwardBody(0, 0, [frameOf(g[i], shapes[i])])));
      return { hM, gB };
    }));
    const want = await step(theirs);
    const got = await step(mine);
    for (const [i, w] of want.entries()) {
      for (const k of ['hM', 'gB'] as const) {
        let d = 0;
        for (let j = 0; j < w[k].length; j++) d = Math.max(d, Math.abs(w[k][j] - got[i][k][j]));
        assert.ok(d <= 1e-5, `${k} of session ${i} differs by ${d}`);
      }
    }
    assert.equal(await metric(batched, 'tandem_batch_requests_count{kind="forward"}'), 1);
    assert.equal(await metric(batched, 'tandem_batch_requests_sum{kind="forward"}'), 3);
    assert.equal(await metric(batched, 'tandem_batch_requests_count{kind="backwardFromTape"}'), 1);
    assert.equal(await metric(plain, 'tandem_batch_requests_count{kind="forward"}'), 3);
    // Per-tenant tokens are the admin's (GET /v1/cluster): /metrics answers without a key and names no tenant.
    assert.doesNotMatch(await (await fetch(`${batched.url}/metrics`)).text(), /tenant1/);
  });
});
