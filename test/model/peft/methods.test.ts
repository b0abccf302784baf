// Every method, through the same checks: its initial values keep the base model's outputs
// (where it promises so), merged equals unmerged, unmerge restores the base weights exactly,
// save then load gives the same outputs, a few gradient steps lower the loss, and dispose
// gives back every tensor and the base weights.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { tf } from '../../../model/backend.ts';
import type { ModelConfig } from '../../../model/config.ts';
import { createAdapter, loadAdapter, saveAdapter } from '../../../model/peft/index.ts';
import type { MethodSpec } from '../../../model/peft/index.ts';
import { tempDir, throwsModelError } from '../helpers.ts';
import { IDS, LLAMA, QWEN2, assertClose, assertWeightsEqual, logits, perturb, snapshot, tinyModel, train } from './helpers.ts';

interface Case {
  name: string;
  specs: MethodSpec[];
  config?: ModelConfig;
  /** The untrained adapter leaves the outputs unchanged. */
  identityAtInit: boolean;
  mergeable: boolean;
  lr?: number;
}

const CASES: Case[] = [
  { name: 'lora', specs: [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] }], identityAtInit: true, mergeable: true },
  { name: 'lora, gaussian init, rsLoRA, dropout', specs: [{ method: 'lora', r: 4, loraAlpha: 8, useRslora: true, loraDropout: 0.1, initLoraWeights: 'gaussian', targetModules: 'all-linear' }], identityAtInit: true, mergeable: true },
  { name: 'lora_fa', specs: [{ method: 'lora_fa', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] }], identityAtInit: true, mergeable: true },
  { name: 'dora', specs: [{ method: 'dora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'o_proj', 'up_proj'] }], identityAtInit: true, mergeable: true },
  { name: 'dora on a model with biases', config: QWEN2, specs: [{ method: 'dora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'k_proj'] }], identityAtInit: true, mergeable: true },
  { name: 'vera', specs: [{ method: 'vera', r: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] }], identityAtInit: true, mergeable: true },
  { name: 'ia3', specs: [{ method: 'ia3' }], identityAtInit: true, mergeable: true, lr: 0.2 },
  { name: 'ia3 on a model with biases, layers 1', config: QWEN2, specs: [{ method: 'ia3', layersToTransform: [1] }], identityAtInit: true, mergeable: true, lr: 0.2 },
  { name: 'prompt_tuning', specs: [{ method: 'prompt_tuning', numVirtualTokens: 3 }], identityAtInit: false, mergeable: false, lr: 0.1 },
  { name: 'bottleneck serial', specs: [{ method: 'bottleneck', bottleneckSize: 4 }], identityAtInit: true, mergeable: false },
  { name: 'bottleneck parallel, mlp, gelu', specs: [{ method: 'bottleneck', bottleneckSize: 4, placement: 'parallel', sublayers: ['mlp'], nonLinearity: 'gelu', layersToTransform: [0, 2] }], identityAtInit: true, mergeable: false },
  { name: 'bitfit', config: QWEN2, specs: [{ method: 'bitfit' }], identityAtInit: true, mergeable: true },
  { name: 'block', specs: [{ method: 'block', layersToTransform: [0, 2] }], identityAtInit: true, mergeable: true, lr: 0.2 },
  {
    name: 'lora on the top block, a soft prompt and a bottleneck at the bottom',
    specs: [
      { method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'], layersToTransform: [2] },
      { method: 'prompt_tuning', numVirtualTokens: 2 },
      { method: 'bottleneck', bottleneckSize: 4, layersToTransform: [0] },
    ],
    identityAtInit: false,
    mergeable: false,
    lr: 0.1,
  },
  {
    name: 'lora on the top, ia3 and bitfit below',
    config: QWEN2,
    specs: [
      { method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'], layersToTransform: [1] },
      { method: 'ia3', layersToTransform: [0] },
      { method: 'bitfit', layersToTransform: [1] },
    ],
    identityAtInit: true,
    mergeable: true,
  },
];

for (const c of CASES) {
  describe(c.name, () => {
    const config = c.config ?? LLAMA;

    it('keeps the base outputs at init, merges exactly, saves and loads, and frees everything', async () => {
      const model = tinyModel(config);
      const base = logits(model);
      const weights = snapshot(model);
      // The model caches RoPE tables per sequence length; virtual tokens lengthen sequences.
      for (let extra = 1; extra <= 3; extra++) logits(model, undefined, IDS.map((row) => [...row, ...row.slice(0, extra)]));
      const tensorsBefore = tf.memory().numTensors;
      const adapter = createAdapter(model, c.specs, { seed: 3 });
      if (c.identityAtInit) assertClose(logits(model, adapter), base, 1e-6, 'untrained adapter vs base');
      perturb(adapter);
      const adapted = logits(model, adapter);
      assert.ok(Math.max(...adapted.map((v, i) => Math.abs(v - base[i]))) > 1e-3, 'the perturbed adapter changes the outputs');

      if (c.mergeable) {
        adapter.merge();
        assert.equal(adapter.merged, true);
        assertClose(logits(model, adapter), adapted, 1e-4, 'merged vs unmerged');
        adapter.unmerge();
        assertClose(logits(model, adapter), adapted, 1e-5, 'after unmerge');
      } else {
        throwsModelError(() => adapter.merge(), 'TANDEM_MERGE_UNSUPPORTED');
        assert.equal(adapter.merged, false);
      }

      const dir = await tempDir();
      await saveAdapter(adapter, dir, { baseModel: 'tiny' });
      adapter.dispose();
      assertWeightsEqual(model, weights, 'base weights after dispose');
      assert.equal(tf.memory().numTensors, tensorsBefore, 'dispose frees every tensor of the adapter');

      const fresh = tinyModel(config);
      const loaded = await loadAdapter(fresh, dir);
      assertClose(logits(fresh, loaded), adapted, 1e-5, 'loaded vs saved');
      loaded.dispose();
      fresh.dispose();
      model.dispose();
    });

    it('trains: gradient descent on its trainable variables lowers the loss', () => {
      const model = tinyModel(config);
      const adapter = createAdapter(model, c.specs, { seed: 3 });
      const { before, after } = train(model, adapter, 6, c.lr ?? 0.5);
      assert.ok(after < before - 1e-3, `loss ${before} -> ${after}`);
      adapter.dispose();
      model.dispose();
    });
  });
}
