// Split training with a middle LoRA the cloud holds (protocol 1.3) takes the steps local
// training of the same three-part adapter takes (bottom and top LoRA on the edge, middle LoRA
// on the cloud): the same loss at every step (f32 codecs) and the same exported adapter, in
// one PEFT folder. With the node on tfjs and on ONNX Runtime.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import { initBackend, readSafetensorsFile, toFloat32 } from '../../model/index.ts';
import type { MethodSpec } from '../../model/index.ts';
import { DEMO_DATA, MODEL_ID, maxAdapterDiff, startTestCloud, tempDir, trainReference } from './helpers.ts';
import type { TestCloud } from './helpers.ts';

const common = { steps: 4, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 3 };
const TARGETS = ['q_proj', 'v_proj'];
const EDGE: MethodSpec = { method: 'lora', r: 4, loraAlpha: 8, targetModules: TARGETS, layersToTransform: [0, 4], initLoraWeights: false };
/** The middle part as local training creates it: the adapter's second method, on the middle blocks of cut (1, 1). */
const MIDDLE: MethodSpec = { method: 'lora', r: 4, loraAlpha: 8, targetModules: TARGETS, layersToTransform: [1, 2, 3] };

/** The node's tandem_held_adapters gauge, from GET /metrics. */
export async function heldGauge(cloud: TestCloud): Promise<number> {
  const text = await (await fetch(`${cloud.url}/metrics`, { headers: { authorization: `Bearer ${cloud.key}` } })).text();
  const line = text.split('\n').find((l) => l.startsWith('tandem_held_adapters '));
  if (line === undefined) throw new Error('no tandem_held_adapters in /metrics');
  return Number(line.split(' ')[1]);
}

// The node's middle on tfjs ('auto': tfjs on the backend) and on ONNX Runtime.
for (const engine of ['auto', 'ort-cpu']) describe(`split training with a cloud-held middle LoRA equals local training of the whole adapter (f32, stories260K, middle on ${engine === 'auto' ? 'tfjs' : engine})`, () => {
  let cloud: TestCloud;
  before(async () => {
    await initBackend();
    cloud = await startTestCloud({ engine });
  });
  after(() => cloud.close());

  it('same loss at every step and the same adapter, exported as one PEFT LoRA folder', async () => {
    const cache = await tempDir('cache');
    const out = await tempDir('out');
    try {
      const split = await trainEdge({
        cloud: cloud.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods: [EDGE], ...common, gradientAccumulationSteps: 2,
        middleLora: { r: 4, alpha: 8, targets: TARGETS }, codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: cache.dir, out: out.dir,
      });
      const local = await trainReference({ methods: [EDGE, MIDDLE], ...common, gradientAccumulationSteps: 2 });
      assert.equal(split.losses.length, common.steps);
      split.losses.forEach((loss, i) => assert.ok(Math.abs(loss - local.losses[i]) <= 1e-5, `step ${i + 1}: split ${loss} vs local ${local.losses[i]}`));
      const diff = maxAdapterDiff(local.adapter, split.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
      // The middle was trained: its B factors moved away from their zero init.
      const middleB = split.adapter.get('base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight');
      assert.ok(middleB !== undefined && middleB.data.some((v) => v !== 0), 'the middle LoRA trained');

      const config = JSON.parse(await readFile(join(out.dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
      assert.equal(config.peft_type, 'LORA');
      assert.equal(config.r, 4);
      assert.deepEqual(config.layers_to_transform, [0, 1, 2, 3, 4]);
      const weights = await readSafetensorsFile(join(out.dir, 'adapter_model.safetensors'));
      assert.equal(maxAdapterDiff(local.adapter, new Map([...weights.tensors].map(([k, t]) => [k, toFloat32(t, 'adapter_model.safetensors', k)]))), diff, 'the folder holds the adapter the run returned');
      assert.equal(await heldGauge(cloud), 0, 'the session closed at the end of the run: its adapter is freed');
    } finally {
      await cache.remove();
      await out.remove();
    }
  });

  it('(IA)^3 held on the middle blocks (k_proj, v_proj, down_proj) with LoRA on the edge: same losses and adapter, one composite folder', async () => {
    const cache = await tempDir('cache');
    const out = await tempDir('out');
    const ia3: MethodSpec = { method: 'ia3', targetModules: ['k_proj', 'v_proj', 'down_proj'], feedforwardModules: ['down_proj'], layersToTransform: [1, 2, 3] };
    try {
      const split = await trainEdge({
        cloud: cloud.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods: [EDGE], ...common,
        middleLora: { method: 'ia3' }, codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: cache.dir, out: out.dir,
      });
      const local = await trainReference({ methods: [EDGE, ia3], ...common });
      split.losses.forEach((loss, i) => assert.ok(Math.abs(loss - local.losses[i]) <= 1e-5, `step ${i + 1}: split ${loss} vs local ${local.losses[i]}`));
      const diff = maxAdapterDiff(local.adapter, split.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
      const scale = split.adapter.get('base_model.model.model.layers.2.mlp.down_proj.ia3_l');
      assert.ok(scale !== undefined && scale.shape[0] === 1 && scale.data.some((v) => v !== 1), 'the middle (IA)^3 trained (an input scale of down_proj)');
      const config = JSON.parse(await readFile(join(out.dir, 'adapter_config.json'), 'utf8')) as { peft_type: string; methods: { tandem_method: string }[] };
      assert.equal(config.peft_type, 'TANDEM');
      assert.deepEqual(config.methods.map((m) => m.tandem_method), ['lora', 'ia3']);
    } finally {
      await cache.remove();
      await out.remove();
    }
  });
});
