// The cloud's middle on ONNX Runtime (`--engine ort-cpu`): the compute workers load ORT in
// their threads, split training through such a node takes the steps local tfjs training takes
// (f32 codecs, within 1e-5), and a backward after eviction recomputes from h_B on ORT.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import { decodeTensor } from '../../protocol/index.ts';
import { DEMO_DATA, MODEL_ID, maxAdapterDiff, tempDir as edgeTempDir, trainReference } from '../edge-client/helpers.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';

const shape: [number, number, number] = [1, 8, HIDDEN];
const h = randomTensor(shape, 31);
const g = randomTensor(shape, 32);

async function stepOn(node: TestNode): Promise<{ gB: Float32Array; hM: Float32Array; recomputed: boolean; askedForH: boolean }> {
  const client = await TestClient.connect(node, await createTenantKey(node, `t${Math.random().toString(36).slice(2, 8)}`));
  await client.hello();
  const fwd = await client.request(client.forwardBody(0, 0, [frameOf(h, shape)]));
  assert.equal(fwd.body.case, 'forwardResult');
  if (fwd.body.case !== 'forwardResult') throw new Error('unreachable');
  const hM = decodeTensor(fwd.body.value.frames[0]);
  let reply = await client.request(client.backwardBody(0, 0, [frameOf(g, shape)]));
  let askedForH = false;
  if (reply.body.case === 'error') {
    assertError(reply, 'TANDEM_ACTIVATIONS_GONE');
    askedForH = true;
    reply = await client.request(client.backwardBody(0, 0, [frameOf(g, shape), frameOf(h, shape)]));
  }
  assert.equal(reply.body.case, 'backwardResult', JSON.stringify(reply.body.value));
  if (reply.body.case !== 'backwardResult') throw new Error('unreachable');
  return { gB: decodeTensor(reply.body.value.frames[0]), hM, recomputed: reply.body.value.recomputed, askedForH };
}

function maxRelDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let scale = 0;
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    scale = Math.max(scale, Math.abs(a[i]));
    worst = Math.max(worst, Math.abs(a[i] - b[i]));
  }
  return worst / Math.max(scale, 1e-12);
}

describe('the cloud middle on ONNX Runtime', () => {
  let ort: TestNode;
  let ortTiny: TestNode;
  let tfjs: TestNode;

  before(async () => {
    [ort, ortTiny, tfjs] = await Promise.all([
      startTestNode({ engine: 'ort-cpu', limits: undefined }),
      startTestNode({ engine: 'ort-cpu', memoryBudgetBytes: 1024 }), // h_B is 2 KiB: never kept
      startTestNode({ engine: 'auto' }), // tfjs, whatever TANDEM_ENGINE says
    ]);
  });
  after(async () => {
    await Promise.all([ort.close(), ortTiny.close(), tfjs.close()]);
  });

  it('runs its compute workers on ort-cpu, and tfjs when no engine is asked for', () => {
    assert.equal(ort.compute.backend, 'ort-cpu');
    assert.equal(ortTiny.compute.backend, 'ort-cpu');
    assert.notEqual(tfjs.compute.backend, 'ort-cpu');
  });

  it('forward and kept-tape backward equal the tfjs node within 1e-4 relative', async () => {
    const a = await stepOn(ort);
    const b = await stepOn(tfjs);
    assert.equal(a.recomputed, false);
    assert.ok(maxRelDiff(b.hM, a.hM) < 1e-4, `h_M differs by ${maxRelDiff(b.hM, a.hM)}`);
    assert.ok(maxRelDiff(b.gB, a.gB) < 1e-4, `g_B differs by ${maxRelDiff(b.gB, a.gB)}`);
  });

  it('evicted by a tiny budget: backward asks for h_B and recomputes on ORT the g_B the kept forward gives', async () => {
    const kept = await stepOn(ort);
    const evicted = await stepOn(ortTiny);
    assert.equal(kept.askedForH, false);
    assert.equal(evicted.askedForH, true);
    assert.equal(evicted.recomputed, true);
    assert.ok(maxRelDiff(kept.gB, evicted.gB) < 1e-6, `recomputed g_B differs by ${maxRelDiff(kept.gB, evicted.gB)}`);
    assert.equal(await metric(ortTiny, 'tandem_recomputes_total'), 1);
  });

  it('split training through the ORT node equals local tfjs training (f32 codecs, LoRA, cut (1, 1))', async () => {
    const common = { steps: 3, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 3 };
    const methods = [{ method: 'lora' as const, r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'], layersToTransform: [0, 4], initLoraWeights: false }];
    const cache = await edgeTempDir('cache');
    try {
      const split = await trainEdge({
        cloud: ort.url, key: ort.adminKey, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods, ...common,
        codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: cache.dir,
      });
      const local = await trainReference({ methods, ...common });
      assert.equal(split.losses.length, common.steps);
      split.losses.forEach((loss, i) => assert.ok(Math.abs(loss - local.losses[i]) <= 1e-5, `step ${i + 1}: split ${loss} vs local ${local.losses[i]}`));
      const diff = maxAdapterDiff(local.adapter, split.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
    } finally {
      await cache.remove();
    }
  });
});
