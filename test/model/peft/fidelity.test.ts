// Each PEFT fidelity fix against PEFT's own source (huggingface/peft, src/peft/...): every test
// here fails on the behaviour before the fix.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { gradients, tf } from '../../../model/backend.ts';
import { createAdapter, loadAdapter, loraScaling, saveAdapter } from '../../../model/peft/index.ts';
import { readSafetensorsFile } from '../../../model/safetensors.ts';
import { Sgd, Trainer } from '../../../model/train/index.ts';
import type { Adapter } from '../../../model/peft/adapter.ts';
import { rejectsModelError, tempDir, throwsModelError } from '../helpers.ts';
import { IDS, lossOf, tinyModel } from './helpers.ts';

// Fields PEFT v0.11.0 knows (src/peft/config.py and src/peft/tuners/<method>/config.py): before
// 0.14, PEFT's config __init__ refuses a file naming any other field.
const PEFT_0_11_COMMON = ['auto_mapping', 'base_model_name_or_path', 'inference_mode', 'peft_type', 'revision', 'task_type'];
const PEFT_0_11_FIELDS: Record<string, string[]> = {
  LORA: ['alpha_pattern', 'bias', 'fan_in_fan_out', 'init_lora_weights', 'layer_replication', 'layers_pattern', 'layers_to_transform', 'loftq_config', 'lora_alpha', 'lora_dropout', 'megatron_config', 'megatron_core', 'modules_to_save', 'r', 'rank_pattern', 'target_modules', 'use_dora', 'use_rslora'],
  VERA: ['bias', 'd_initial', 'fan_in_fan_out', 'init_weights', 'layers_pattern', 'layers_to_transform', 'modules_to_save', 'projection_prng_key', 'r', 'save_projection', 'target_modules', 'vera_dropout'],
  IA3: ['fan_in_fan_out', 'feedforward_modules', 'init_ia3_weights', 'modules_to_save', 'target_modules'],
  PROMPT_TUNING: ['num_attention_heads', 'num_layers', 'num_transformer_submodules', 'num_virtual_tokens', 'token_dim', 'prompt_tuning_init', 'prompt_tuning_init_text', 'tokenizer_kwargs', 'tokenizer_name_or_path'],
};

async function savedConfig(specs: Parameters<typeof createAdapter>[1]): Promise<{ dir: string; config: Record<string, unknown> }> {
  const model = tinyModel();
  const adapter = createAdapter(model, specs, { seed: 3 });
  const dir = await tempDir();
  await saveAdapter(adapter, dir, { baseModel: 'org/tiny' });
  adapter.dispose();
  model.dispose();
  return { dir, config: JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown> };
}

describe('PEFT fidelity', () => {
  it("VeRA's shared projections are drawn as PEFT's _kaiming_init draws them: U(±sqrt(6/fan_in))", async () => {
    const model = tinyModel();
    const r = 64;
    const adapter = createAdapter(model, [{ method: 'vera', r, targetModules: ['q_proj', 'up_proj'] }], { seed: 1 });
    const state = adapter.state();
    const a = state.get('base_model.vera_A')!.variable;
    const b = state.get('base_model.vera_B')!.variable;
    // fan_in is each matrix's second dimension: max in-features (16) for A [r, 16], r for B [24, r].
    for (const [m, fanIn] of [[a, a.shape[1] as number], [b, r]] as const) {
      const values = Array.from(m.dataSync() as Float32Array);
      const maxAbs = values.reduce((x, v) => Math.max(x, Math.abs(v)), 0);
      const bound = Math.sqrt(6 / fanIn);
      assert.ok(maxAbs <= bound, `within the bound ${bound}: ${maxAbs}`);
      // With this many draws the largest is close to the bound, far above 1/sqrt(fan_in).
      assert.ok(maxAbs > 0.9 * bound, `reaches the bound ${bound}: ${maxAbs}`);
      const variance = values.reduce((x, v) => x + v * v, 0) / values.length;
      assert.ok(Math.abs(variance - 2 / fanIn) < 0.2 * (2 / fanIn), `variance ${variance} is gain^2 / fan_in = ${2 / fanIn}`);
    }
    adapter.dispose();
    model.dispose();
  });

  it('LoRA with target_modules "all-linear" on some layers is written as the module list PEFT reads; such a file is refused as PEFT refuses it', async () => {
    const { dir, config } = await savedConfig([{ method: 'lora', r: 2, targetModules: 'all-linear', layersToTransform: [1] }]);
    assert.deepEqual(config.target_modules, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
    assert.deepEqual(config.layers_to_transform, [1]);
    const keys = [...(await readSafetensorsFile(join(dir, 'adapter_model.safetensors'))).tensors.keys()];
    assert.equal(keys.filter((k) => k.endsWith('lora_A.weight')).length, 7);
    assert.ok(keys.every((k) => k.includes('model.layers.1.')));
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, target_modules: 'all-linear' }));
    const model = tinyModel();
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_PEFT_CONFIG_INVALID', 'layers_to_transform', 'all-linear');
    model.dispose();
  });

  it('prompt tuning with TEXT init writes the text and the tokenizer PEFT requires, and refuses a spec without them', async () => {
    const { config } = await savedConfig([{ method: 'prompt_tuning', numVirtualTokens: 3, promptTuningInit: 'TEXT', initTokenIds: [4, 5], promptTuningInitText: 'four five', tokenizerNameOrPath: 'org/tiny' }]);
    assert.equal(config.prompt_tuning_init, 'TEXT');
    assert.equal(config.prompt_tuning_init_text, 'four five');
    assert.equal(config.tokenizer_name_or_path, 'org/tiny');
    const model = tinyModel();
    throwsModelError(() => createAdapter(model, [{ method: 'prompt_tuning', numVirtualTokens: 3, promptTuningInit: 'TEXT', initTokenIds: [4, 5] }]), 'TANDEM_PEFT_CONFIG_INVALID', 'promptTuningInitText');
    throwsModelError(() => createAdapter(model, [{ method: 'prompt_tuning', numVirtualTokens: 3, promptTuningInit: 'TEXT', initTokenIds: [4, 5], promptTuningInitText: 'x' }]), 'TANDEM_PEFT_CONFIG_INVALID', 'tokenizerNameOrPath');
    model.dispose();
  });

  it("LoRA-FA projects B's gradient as PEFT's LoraFAOptimizer does: (1/s^2) grad_B pinv(A A^T + 1e-8 I)", () => {
    const model = tinyModel();
    const spec = { method: 'lora_fa', r: 4, loraAlpha: 8, targetModules: ['q_proj'], initLoraWeights: false };
    const adapter = createAdapter(model, [spec], { seed: 5 });
    const vars = adapter.trainableVariables();
    const names = [...vars.keys()];
    assert.ok(names.every((n) => n.includes('lora_B')), 'only B trains');
    const { value, grads } = gradients(() => lossOf(model, adapter, false), names.map((n) => vars.get(n)!));
    const raw = new Map(names.map((n, i) => [n, grads[i]!]));
    const before = new Map([...raw].map(([n, g]) => [n, g.arraySync() as number[][]]));
    assert.ok(adapter.projectGradients, 'LoRA-FA changes the gradients its optimizer applies');
    adapter.projectGradients(raw);
    const s = loraScaling({ r: 4, loraAlpha: 8, useRslora: false });
    for (const name of names) {
      const a = adapter.state().get(name.replace('lora_B', 'lora_A'))!.variable.arraySync() as number[][];
      const projected = raw.get(name)!.arraySync() as number[][];
      const g = before.get(name)!;
      // projected · (A A^T + δI) · s^2 gives the raw gradient back (A has full row rank here).
      const r = a.length;
      const aat = a.map((ai) => a.map((aj) => ai.reduce((x, v, k) => x + v * aj[k], 0)));
      for (let i = 0; i < r; i++) aat[i][i] += 1e-8;
      let worst = 0;
      let scale = 0;
      for (let o = 0; o < g.length; o++) {
        for (let j = 0; j < r; j++) {
          const back = projected[o].reduce((x, v, k) => x + v * aat[k][j], 0) * s * s;
          worst = Math.max(worst, Math.abs(back - g[o][j]));
          scale = Math.max(scale, Math.abs(g[o][j]));
        }
      }
      assert.ok(worst <= 1e-4 * scale, `${name}: ${worst} vs ${scale}`);
      assert.ok(maxDiff(projected, g) > 1e-3 * scale, 'the projection changes the gradient');
    }
    tf.dispose([value, ...raw.values()]);
    adapter.dispose();
    // Plain LoRA applies its raw gradients.
    const plain = createAdapter(model, [{ ...spec, method: 'lora' }], { seed: 5 });
    const g = new Map([['x', tf.ones([2, 2])]]);
    plain.projectGradients?.(g);
    assert.deepEqual(g.get('x')!.arraySync(), [[1, 1], [1, 1]]);
    tf.dispose([...g.values()]);
    plain.dispose();
    model.dispose();
  });

  it("the training loop applies LoRA-FA's projected gradient: one SGD step moves B by the projection of the raw step", async () => {
    const model = tinyModel();
    const spec = { method: 'lora_fa', r: 2, loraAlpha: 4, targetModules: ['v_proj'], initLoraWeights: false };
    const stepOf = async (adapter: Adapter): Promise<Map<string, number[][]>> => {
      const vars = adapter.trainableVariables();
      const before = new Map([...vars].map(([k, v]) => [k, v.arraySync() as number[][]]));
      const trainer = new Trainer({ model, adapter, optimizer: new Sgd(), schedule: { kind: 'constant', lr: 1, warmupSteps: 0, totalSteps: 1 } });
      await trainer.trainStep([{ ids: IDS, labels: IDS }]);
      return new Map([...vars].map(([k, v]) => [k, (v.arraySync() as number[][]).map((row, i) => row.map((x, j) => x - before.get(k)![i][j]))]));
    };
    const fa = createAdapter(model, [spec], { seed: 2 });
    const projected = await stepOf(fa);
    // The same adapter seen without its projection: the raw gradient step.
    const same = createAdapter(model, [spec], { seed: 2 });
    const raw = await stepOf({ hooks: same.hooks, numVirtualTokens: 0, trainableVariables: () => same.trainableVariables(), merge: () => same.merge(), unmerge: () => same.unmerge(), merged: false, dispose: () => same.dispose() });
    const s = loraScaling({ r: 2, loraAlpha: 4, useRslora: false });
    for (const [key, d] of projected) {
      const a = fa.state().get(key.replace('lora_B', 'lora_A'))!.variable.arraySync() as number[][];
      const aat = a.map((ai) => a.map((aj) => ai.reduce((x, v, k) => x + v * aj[k], 0)));
      const back = d.map((row) => aat[0].map((_, j) => row.reduce((x, v, k) => x + v * aat[k][j], 0) * s * s));
      const want = raw.get(key)!;
      const scale = Math.max(...want.flat().map(Math.abs));
      assert.ok(scale > 0, 'B moved');
      assert.ok(maxDiff(back, want) <= 1e-3 * scale, `${key}: ΔB (A A^T) s^2 equals the raw step`);
      assert.ok(maxDiff(d, want) > 1e-2 * scale, 'the projection changed the step');
    }
    fa.dispose();
    same.dispose();
    model.dispose();
  });

  it('writes only fields PEFT 0.11 knows, so every version from 0.11 on loads the file', async () => {
    const cases: [string, Parameters<typeof createAdapter>[1]][] = [
      ['LORA', [{ method: 'lora', r: 2 }]],
      ['LORA', [{ method: 'dora', r: 2 }]],
      ['VERA', [{ method: 'vera', r: 4 }]],
      ['IA3', [{ method: 'ia3' }]],
      ['PROMPT_TUNING', [{ method: 'prompt_tuning', numVirtualTokens: 2 }]],
    ];
    for (const [peftType, specs] of cases) {
      const { config } = await savedConfig(specs);
      assert.equal(config.peft_type, peftType);
      const extra = Object.keys(config).filter((k) => !PEFT_0_11_COMMON.includes(k) && !PEFT_0_11_FIELDS[peftType].includes(k));
      assert.deepEqual(extra, [], `${peftType} fields PEFT 0.11 does not know`);
    }
  });

  it('refuses config fields that change the computation and Tandem does not implement; ignores those that change nothing', async () => {
    const { dir, config } = await savedConfig([{ method: 'lora', r: 2 }]);
    const model = tinyModel();
    const load = async (extra: Record<string, unknown>) => {
      await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, ...extra }));
      return loadAdapter(model, dir);
    };
    await rejectsModelError(load({ alora_invocation_tokens: [5, 6] }), 'TANDEM_PEFT_CONFIG_INVALID', 'alora_invocation_tokens');
    await rejectsModelError(load({ rank_pattern: { q_proj: 4 } }), 'TANDEM_PEFT_CONFIG_INVALID', 'rank_pattern');
    await rejectsModelError(load({ use_qalora: true }), 'TANDEM_PEFT_CONFIG_INVALID', 'use_qalora');
    await rejectsModelError(load({ trainable_token_indices: [1, 2] }), 'TANDEM_PEFT_CONFIG_INVALID', 'trainable_token_indices');
    // What a current PEFT writes for a plain LoRA adapter: every option at its default.
    const current = {
      peft_version: '0.17.1', use_qalora: false, qalora_group_size: 16, megatron_core: 'megatron.core', megatron_config: null,
      runtime_config: { ephemeral_gpu_offload: false }, loftq_config: {}, eva_config: null, corda_config: null, lora_bias: false,
      exclude_modules: null, alora_invocation_tokens: null, trainable_token_indices: null, target_parameters: null, ensure_weight_tying: false,
    };
    const adapter = await load(current);
    assert.equal(adapter.methods[0].method.name, 'lora');
    adapter.dispose();
    model.dispose();
  });
});

function maxDiff(a: number[][], b: number[][]): number {
  return Math.max(...a.map((row, i) => Math.max(...row.map((v, j) => Math.abs(v - b[i][j])))));
}
