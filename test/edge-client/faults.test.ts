// Faults during split training: the cloud node killed and restarted mid-training, and
// activations evicted before their backward. Either way the run ends exactly where an
// undisturbed run ends: no step lost, none applied twice, recomputation gives the same result.
// A node answering that a store it needs is full for now (a cluster's object store for large
// bodies) is retried, as a node still loading its model is.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainOptions, EdgeTrainResult } from '../../edge-client/index.ts';
import { initBackend } from '../../model/index.ts';
import { WIRE_ERRORS } from '../../protocol/index.ts';
import { DEMO_DATA, MODEL_ID, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';
import { startHostileCloud } from './hostile-cloud-proxy.ts';

const run = {
  model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 6, batchSize: 4, gradientAccumulationSteps: 2, seqLen: 32, lr: 5e-3, seed: 5,
  methods: [{ method: 'lora', r: 4, targetModules: ['q_proj', 'v_proj'], initLoraWeights: false }], evaluate: false, requestTimeoutMs: 5_000,
} satisfies Partial<EdgeTrainOptions>;

function assertSameRun(a: EdgeTrainResult, b: EdgeTrainResult, tolerance: number): void {
  assert.equal(a.steps, b.steps);
  assert.deepEqual([...a.adapter.keys()].sort(), [...b.adapter.keys()].sort());
  a.losses.forEach((loss, i) => assert.ok(Math.abs(loss - b.losses[i]) <= tolerance, `step ${i + 1}: ${loss} vs ${b.losses[i]}`));
  for (const [name, t] of a.adapter) {
    const u = b.adapter.get(name)!.data;
    for (let i = 0; i < t.data.length; i++) assert.ok(Math.abs(t.data[i] - u[i]) <= tolerance, `${name}[${i}]: ${t.data[i]} vs ${u[i]}`);
  }
}

describe('split training under faults', () => {
  let cache: { dir: string; remove(): Promise<void> };
  let reference: EdgeTrainResult;
  let cloud: TestCloud;

  before(async () => {
    await initBackend();
    cache = await tempDir('cache');
    cloud = await startTestCloud();
    reference = await trainEdge({ ...run, cloud: cloud.url, key: cloud.key, cacheDir: cache.dir });
  });
  after(async () => {
    await cloud.close();
    await cache.remove();
  });

  it('the cloud node is killed and restarted mid-training: the edge reattaches and finishes the same run', async () => {
    let restarted: Promise<void> | undefined;
    const result = await trainEdge({
      ...run, cloud: cloud.url, key: cloud.key, cacheDir: cache.dir,
      onEvent: (e) => {
        // Not awaited: the node goes down while step 3's requests are on their way.
        if (e.type === 'step' && e.step === 2) restarted = cloud.restart();
      },
    });
    await restarted;
    assert.ok(result.wire.reconnects >= 1, 'the edge reconnected');
    assert.equal(result.wire.reattached + result.wire.reopened, result.wire.reconnects, 'each reconnect reattached the session');
    assert.equal(result.losses.length, run.steps, 'every step ran once');
    assertSameRun(result, reference, 1e-6);
  });

  it('activations evicted before their backward: the cloud recomputes from the resent h_B and the result is the same', async () => {
    const tight = await startTestCloud({ memoryBudgetBytes: 1 });
    try {
      const started = performance.now();
      const result = await trainEdge({ ...run, cloud: tight.url, key: tight.key, cacheDir: cache.dir });
      const elapsedMs = performance.now() - started;
      assert.equal(result.wire.frames.recomputes, run.steps * run.gradientAccumulationSteps, 'every backward was recomputed');
      // The wait on the cloud counts each Forward and Backward once, the resend of h_B included.
      assert.ok(result.wire.frames.waitMs > 0 && result.wire.frames.waitMs < elapsedMs, `waited ${result.wire.frames.waitMs} ms of a ${elapsedMs} ms run`);
      assertSameRun(result, reference, 1e-6);
    } finally {
      await tight.close();
    }
  });

  it('a store full for now (503 TANDEM_STORE_FULL): the edge backs off, sends the request again and finishes the same run', async () => {
    // The first answer to each of step 2's Forward and Backward says the store is full.
    const refused = new Set<string>();
    const proxy = await startHostileCloud(cloud.url, {
      reply: (request, reply) => {
        const body = request.body;
        if ((body.case !== 'forward' && body.case !== 'backward') || body.value.step !== 2 || body.value.microbatch !== 0 || refused.has(body.case)) return reply;
        refused.add(body.case);
        return { ...reply, body: { case: 'error', value: { code: WIRE_ERRORS.storeFull, message: 'TANDEM_STORE_FULL: the cluster\'s object store tandem-wire is full for now', details: {} } } };
      },
    });
    try {
      const result = await trainEdge({ ...run, cloud: proxy.url, key: cloud.key, cacheDir: cache.dir });
      assert.deepEqual([...refused].sort(), ['backward', 'forward']);
      assert.equal(result.wire.retries, 2, 'each refused request was sent once more');
      assert.equal(result.losses.length, run.steps);
      assertSameRun(result, reference, 1e-6);
    } finally {
      await proxy.close();
    }
  });
});
