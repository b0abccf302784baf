// Compute off the event loop (issue 9, findings 2 and 3): the middle runs in worker threads
// fed round-robin per tenant, so heartbeats, REST and other tenants' small requests are
// answered while a large one computes; a worker that dies is restarted, /v1/ready says 503
// meanwhile, and the activations it held are recomputed from h_B.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { decodeTensor } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import { HIDDEN, TestClient, api, createTenantKey, frameOf, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let heavy: TestClient;
// The cpu backend, not the suite's wasm: these cases need a Forward that computes for seconds
// (1024 tokens of `big`) while small requests come and go.
const big: [number, number, number] = [2, 512, HIDDEN];

before(async () => {
  node = await startTestNode({ backend: 'cpu', limits: { maxMessageBytes: 4 * 1024 * 1024, maxFrameBytes: 4 * 1024 * 1024 }, maxMicrobatchTokens: 4096 });
  good = await bystander(node);
  heavy = await TestClient.connect(node, await createTenantKey(node, 'heavy'));
  heavy.maxMessageBytes = 4 * 1024 * 1024;
  await heavy.hello();
});

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

describe('compute runs in workers, fairly, and survives its backend', () => {
  it('a heartbeat and /v1/ready are answered while a 1024-token Forward computes', async () => {
    const order: string[] = [];
    const forward = heavy.request(heavy.forwardBody(0, 0, [frameOf(randomTensor(big, 1), big)], false)).then((r) => {
      order.push('forward');
      return r;
    });
    await sleep(20); // the Forward is on its way (and decoded) before the small requests leave
    const beat = good.client.request({ case: 'heartbeat', value: { sessionId: good.client.sessionId, sequence: 1, sentAtMs: Date.now() } }).then((r) => {
      order.push('heartbeat');
      return r;
    });
    const ready = api(node, 'GET', '/v1/ready').then((r) => {
      order.push('ready');
      return r;
    });
    assert.equal((await beat).body.case, 'heartbeat');
    assert.equal((await ready).status, 200);
    assert.equal((await forward).body.case, 'forwardResult');
    assert.equal(order.length, 3);
    assert.equal(order.at(-1), 'forward', `the small requests came back first: ${order.join(', ')}`);
  });

  it('tenants are served in turn: one small Forward is not queued behind another tenant\'s five larger ones', async () => {
    const lightClient = await TestClient.connect(node, await createTenantKey(node, 'light'));
    await lightClient.hello();
    const done: string[] = [];
    const mid: [number, number, number] = [1, 256, HIDDEN];
    const h = randomTensor(mid, 2);
    const heavyOnes = [0, 1, 2, 3, 4].map((mb) => heavy.request(heavy.forwardBody(1, mb, [frameOf(h, mid)], false)).then((r) => {
      done.push(`heavy${mb}`);
      return r;
    }));
    await sleep(20);
    const small: [number, number, number] = [1, 8, HIDDEN];
    const light = lightClient.request(lightClient.forwardBody(0, 0, [frameOf(randomTensor(small, 3), small)], false)).then((r) => {
      done.push('light');
      return r;
    });
    const replies: Envelope[] = await Promise.all([...heavyOnes, light]);
    for (const reply of replies) assert.equal(reply.body.case, 'forwardResult');
    assert.ok(done.indexOf('light') <= 2, `the light tenant's Forward finished at position ${done.indexOf('light')} of ${done.join(', ')}`);
  });

  it('a compute worker that dies is restarted: /v1/ready says 503 meanwhile, queued work completes, a lost tape is recomputed from h_B bit for bit', async () => {
    const shape: [number, number, number] = [1, 8, HIDDEN];
    const h = randomTensor(shape, 41);
    const g = randomTensor(shape, 42);
    const tenant = await TestClient.connect(node, await createTenantKey(node, 'tapes'));
    await tenant.hello();
    // The reference: a backward from the tape, no crash.
    assert.equal((await tenant.request(tenant.forwardBody(0, 0, [frameOf(h, shape)]))).body.case, 'forwardResult');
    const reference = await tenant.request(tenant.backwardBody(0, 0, [frameOf(g, shape)]));
    assert.equal(reference.body.case, 'backwardResult');
    // The same forward, whose tape the crash takes away.
    assert.equal((await tenant.request(tenant.forwardBody(1, 0, [frameOf(h, shape)]))).body.case, 'forwardResult');
    const restartsBefore = await metric(node, 'tandem_compute_restarts_total');
    const inFlight = heavy.request(heavy.forwardBody(2, 0, [frameOf(randomTensor(big, 5), big)], false));
    await survives(node, good, async () => {
      await sleep(20);
      await node.compute.terminateWorker(0);
      const during = await api(node, 'GET', '/v1/ready');
      assert.equal(during.status, 503, 'not ready while the worker restarts');
      for (let i = 0; i < 600 && (await api(node, 'GET', '/v1/ready')).status !== 200; i++) await sleep(50);
    });
    const rerun = await inFlight;
    assert.equal(rerun.body.case, 'forwardResult', `the request running when the worker died is run again: ${JSON.stringify(rerun.body.value)}`);
    assert.equal(await metric(node, 'tandem_compute_restarts_total'), restartsBefore + 1);
    assert.equal(node.compute.restarts, 1);
    const after = await tenant.request(tenant.backwardBody(1, 0, [frameOf(g, shape)]));
    assert.equal(after.body.case, 'backwardResult', JSON.stringify(after.body.value));
    if (after.body.case === 'backwardResult' && reference.body.case === 'backwardResult') {
      assert.deepEqual(decodeTensor(after.body.value.frames[0]), decodeTensor(reference.body.value.frames[0]));
    }
  });
});
