// An adapter folder built by hand from PEFT's rules (what PEFT's save_pretrained writes for
// LoRA) loads and computes W + scaling * B A, with the merge done here independently in plain
// loops over the base weights.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { LlamaModel } from '../../../model/llama/llama.ts';
import { loadAdapter } from '../../../model/peft/index.ts';
import { Rng } from '../../../model/random.ts';
import { writeSafetensorsFile } from '../../../model/safetensors.ts';
import { tempDir, rejectsModelError } from '../helpers.ts';
import { LLAMA, assertClose, baseArrays, logits, tinyModel } from './helpers.ts';

const MODULES = { q_proj: 'self_attn', v_proj: 'self_attn', down_proj: 'mlp' } as const;

async function writePeftLora(dir: string, options: { r: number; alpha: number; rslora: boolean; layers: number[]; extra?: Record<string, unknown> }): Promise<Map<string, { a: Float32Array; b: Float32Array; shape: number[] }>> {
  const { r } = options;
  const config = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: 'tiny-llama',
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: options.layers.length === LLAMA.numHiddenLayers ? null : options.layers,
    loftq_config: {},
    lora_alpha: options.alpha,
    lora_dropout: 0.05,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r,
    rank_pattern: {},
    revision: null,
    target_modules: Object.keys(MODULES),
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: options.rslora,
    ...options.extra,
  };
  const rng = new Rng(42);
  const tensors = new Map<string, { dtype: 'F32'; shape: number[]; data: Float32Array }>();
  const deltas = new Map<string, { a: Float32Array; b: Float32Array; shape: number[] }>();
  const base = baseArrays();
  for (const layer of options.layers) {
    for (const [name, group] of Object.entries(MODULES)) {
      const path = `model.layers.${layer}.${group}.${name}`;
      const [out, inn] = base.get(`${path}.weight`)!.shape;
      const a = Float32Array.from({ length: r * inn }, () => rng.normal() * 0.3);
      const b = Float32Array.from({ length: out * r }, () => rng.normal() * 0.3);
      // PEFT's keys: base_model.model.<module>.lora_A.weight [r, in], lora_B.weight [out, r]; "default" stripped.
      tensors.set(`base_model.model.${path}.lora_A.weight`, { dtype: 'F32', shape: [r, inn], data: a });
      tensors.set(`base_model.model.${path}.lora_B.weight`, { dtype: 'F32', shape: [out, r], data: b });
      deltas.set(`${path}.weight`, { a, b, shape: [out, inn] });
    }
  }
  await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
  await writeFile(join(dir, 'adapter_config.json'), JSON.stringify(config, null, 2));
  return deltas;
}

/** W + scaling * B A by plain loops, into a copy of the base arrays, then a model of its own. */
function mergedByHand(deltas: Map<string, { a: Float32Array; b: Float32Array; shape: number[] }>, r: number, scaling: number): LlamaModel {
  const arrays = baseArrays();
  for (const [name, { a, b, shape }] of deltas) {
    const w = arrays.get(name)!.data;
    const [out, inn] = shape;
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < inn; i++) {
        let s = 0;
        for (let k = 0; k < r; k++) s += b[o * r + k] * a[k * inn + i];
        w[o * inn + i] += scaling * s;
      }
    }
  }
  return LlamaModel.fromArrays(LLAMA, arrays);
}

describe('a LoRA adapter written by PEFT rules', () => {
  for (const rslora of [false, true]) {
    it(`loads and equals W + ${rslora ? 'alpha/sqrt(r)' : 'alpha/r'} B A merged independently`, async () => {
      const dir = await tempDir();
      const r = 4;
      const alpha = 8;
      const deltas = await writePeftLora(dir, { r, alpha, rslora, layers: [0, 1, 2] });
      const model = tinyModel();
      const adapter = await loadAdapter(model, dir);
      const expected = mergedByHand(deltas, r, rslora ? alpha / Math.sqrt(r) : alpha / r);
      assertClose(logits(model, adapter), logits(expected), 1e-4, 'adapter vs hand-merged');
      // The merged path agrees too.
      adapter.merge();
      assertClose(logits(model, adapter), logits(expected), 1e-4, 'merged adapter vs hand-merged');
      adapter.dispose();
      expected.dispose();
      model.dispose();
    });
  }

  it('honours layers_to_transform', async () => {
    const dir = await tempDir();
    const deltas = await writePeftLora(dir, { r: 2, alpha: 4, rslora: false, layers: [1] });
    const model = tinyModel();
    const adapter = await loadAdapter(model, dir);
    assert.equal(adapter.trainableVariables().size, 6);
    const expected = mergedByHand(deltas, 2, 2);
    assertClose(logits(model, adapter), logits(expected), 1e-4, 'layer 1 only');
    adapter.dispose();
    expected.dispose();
    model.dispose();
  });

  it('refuses PEFT options that change the math, naming the file and field', async () => {
    const dir = await tempDir();
    await writePeftLora(dir, { r: 2, alpha: 4, rslora: false, layers: [0, 1, 2], extra: { fan_in_fan_out: true } });
    const model = tinyModel();
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_PEFT_CONFIG_INVALID', 'fan_in_fan_out', 'adapter_config.json');
    model.dispose();
  });
});
