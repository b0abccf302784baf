// Configuration, targeting, the registry and the exact on-disk names.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { tf } from '../../../model/backend.ts';
import { KvCache, LlamaModel } from '../../../model/llama/llama.ts';
import { MethodRegistry, createAdapter, defaultRegistry, lora, loadAdapter, saveAdapter } from '../../../model/peft/index.ts';
import { readSafetensorsFile } from '../../../model/safetensors.ts';
import { rejectsModelError, tempDir, throwsModelError } from '../helpers.ts';
import { IDS, QWEN2, assertClose, logits, perturb, tinyModel } from './helpers.ts';

const keysOf = (specs: Parameters<typeof createAdapter>[1]): string[] => {
  const model = tinyModel();
  const adapter = createAdapter(model, specs);
  const keys = [...adapter.state().keys()];
  adapter.dispose();
  model.dispose();
  return keys;
};

describe('registry', () => {
  it('rejects unknown and duplicate method names', () => {
    const model = tinyModel();
    throwsModelError(() => createAdapter(model, [{ method: 'lorra' }]), 'TANDEM_PEFT_METHOD_UNKNOWN', 'lorra', 'lora');
    throwsModelError(() => new MethodRegistry([lora, lora]), 'TANDEM_PEFT_METHOD_DUPLICATE', 'lora');
    assert.deepEqual(defaultRegistry().names(), ['lora', 'dora', 'lora_fa', 'vera', 'ia3', 'prompt_tuning', 'bottleneck', 'bitfit', 'block']);
    model.dispose();
  });
});

describe('configuration errors', () => {
  const model = tinyModel();
  const bad: [Record<string, unknown>, string][] = [
    [{ method: 'lora', r: 0 }, 'r'],
    [{ method: 'lora', loraDropout: 1 }, 'loraDropout'],
    [{ method: 'lora', targetModules: [] }, 'targetModules'],
    [{ method: 'lora', targetModules: 'q_proj(' }, 'targetModules'],
    [{ method: 'lora', targetModules: ['qkv'] }, 'targetModules'],
    [{ method: 'lora', layersToTransform: [7] }, 'layersToTransform'],
    [{ method: 'lora', targetModules: '.*q_proj', layersToTransform: [0] }, 'layersToTransform'],
    [{ method: 'lora', rankk: 4 }, 'rankk'],
    [{ method: 'lora', fanInFanOut: true }, 'fanInFanOut'],
    [{ method: 'ia3', targetModules: ['k_proj'], feedforwardModules: ['down_proj'] }, 'feedforwardModules'],
    [{ method: 'prompt_tuning' }, 'numVirtualTokens'],
    [{ method: 'prompt_tuning', numVirtualTokens: 2, promptTuningInit: 'TEXT' }, 'initTokenIds'],
    [{ method: 'bottleneck', sublayers: ['ffn'] }, 'sublayers'],
    [{ method: 'block' }, 'layersToTransform'],
    [{ method: 'bitfit' }, 'bias'],
  ];
  for (const [spec, field] of bad) {
    it(`${JSON.stringify(spec)} names ${field}`, () => throwsModelError(() => createAdapter(model, [spec as { method: string }]), 'TANDEM_PEFT_CONFIG_INVALID', field));
  }
  it('two methods on the same module are refused', () => {
    throwsModelError(() => createAdapter(model, [{ method: 'lora' }, { method: 'vera' }]), 'TANDEM_PEFT_CONFIG_INVALID', 'q_proj');
    throwsModelError(() => createAdapter(model, [{ method: 'block', layersToTransform: [0] }, { method: 'lora' }]), 'TANDEM_PEFT_CONFIG_INVALID', 'model.layers.0');
  });
});

describe('targeting', () => {
  it('target_modules as a list of suffixes, a regex, all-linear; layers_to_transform', () => {
    const loraKeys = (spec: Record<string, unknown>) => keysOf([{ method: 'lora', ...spec }]).filter((k) => k.endsWith('lora_A.weight'));
    assert.equal(loraKeys({ targetModules: ['q_proj', 'v_proj'] }).length, 6);
    assert.equal(loraKeys({ targetModules: ['self_attn.o_proj'] }).length, 3);
    assert.deepEqual(loraKeys({ targetModules: 'model\\.layers\\.[12]\\.mlp\\.(up|down)_proj' }), [
      'base_model.model.model.layers.1.mlp.up_proj.lora_A.weight',
      'base_model.model.model.layers.1.mlp.down_proj.lora_A.weight',
      'base_model.model.model.layers.2.mlp.up_proj.lora_A.weight',
      'base_model.model.model.layers.2.mlp.down_proj.lora_A.weight',
    ]);
    assert.equal(loraKeys({ targetModules: 'all-linear' }).length, 21);
    // A regex from a file runs against every module path on a backtracking engine: one that could
    // take exponential time is refused before it runs, with the limit named.
    throwsModelError(() => keysOf([{ method: 'lora', targetModules: '(.*.*)*X' }]), 'TANDEM_PEFT_CONFIG_INVALID', 'quantifies a group');
    throwsModelError(() => keysOf([{ method: 'lora', targetModules: '.*.*.*.*.*X' }]), 'TANDEM_PEFT_CONFIG_INVALID', 'more than 4 quantifiers');
    throwsModelError(() => keysOf([{ method: 'lora', targetModules: `${'q'.repeat(300)}` }]), 'TANDEM_PEFT_CONFIG_INVALID', 'over the limit of 256');
    assert.equal(loraKeys({ targetModules: '.*\\.(q_proj|v_proj)' }).length, 6, 'escaped dots and an unrepeated group pass');
    assert.deepEqual(loraKeys({ targetModules: ['q_proj'], layersToTransform: 1 }), ['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight']);
  });

  it('applies only to the layers a model part holds (the cut)', () => {
    const full = tinyModel();
    const bottom = new LlamaModel(full.config, new Map([...full.weights].filter(([k]) => !k.startsWith('model.layers.2.'))));
    const adapter = createAdapter(bottom, [{ method: 'lora', targetModules: ['q_proj'] }]);
    assert.equal(adapter.trainableVariables().size, 4);
    throwsModelError(() => createAdapter(bottom, [{ method: 'lora', layersToTransform: [2] }]), 'TANDEM_PEFT_CONFIG_INVALID', 'does not hold');
    adapter.dispose();
    full.dispose();
  });
});

describe('scaling and initialization', () => {
  it('rsLoRA scales B A by alpha/sqrt(r), LoRA by alpha/r', () => {
    const model = tinyModel();
    const name = 'model.layers.0.self_attn.q_proj';
    /** (merged W - W) / (B A), averaged over the entries: the scaling the merge applied. */
    const scalingOf = (useRslora: boolean): number => {
      const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, useRslora, targetModules: ['q_proj'], layersToTransform: [0] }], { seed: 1 });
      perturb(adapter);
      const vars = adapter.trainableVariables();
      const ba = tf.tidy(() => tf.matMul(vars.get(`base_model.model.${name}.lora_B.weight`)!, vars.get(`base_model.model.${name}.lora_A.weight`)!).dataSync());
      const w = model.weight(`${name}.weight`);
      const base = Float32Array.from(w.dataSync());
      adapter.merge();
      const merged = Float32Array.from(w.dataSync());
      adapter.dispose();
      let num = 0;
      let den = 0;
      for (let i = 0; i < ba.length; i++) {
        num += (merged[i] - base[i]) * ba[i];
        den += ba[i] * ba[i];
      }
      return num / den;
    };
    assert.ok(Math.abs(scalingOf(false) - 8 / 4) < 1e-3);
    assert.ok(Math.abs(scalingOf(true) - 8 / Math.sqrt(4)) < 1e-3);
    model.dispose();
  });

  it('LoRA A is Kaiming-uniform in +-1/sqrt(in), B zero; gaussian A has std 1/r', () => {
    const model = tinyModel();
    const a = createAdapter(model, [{ method: 'lora', r: 4, targetModules: 'all-linear' }], { seed: 2 });
    for (const [key, v] of a.state()) {
      const data = v.variable.dataSync();
      if (key.endsWith('lora_B.weight')) assert.ok(data.every((x) => x === 0), key);
      else {
        const bound = 1 / Math.sqrt(v.variable.shape[1] as number);
        assert.ok(data.every((x) => Math.abs(x) <= bound), key);
        assert.ok(Math.max(...data) > bound * 0.8, `${key} spans its range`);
      }
    }
    a.dispose();
    const g = createAdapter(model, [{ method: 'lora', r: 4, initLoraWeights: 'gaussian', targetModules: 'all-linear' }], { seed: 2 });
    const all = [...g.state()].filter(([k]) => k.endsWith('lora_A.weight')).flatMap(([, v]) => [...v.variable.dataSync()]);
    const std = Math.sqrt(all.reduce((s, x) => s + x * x, 0) / all.length);
    assert.ok(Math.abs(std - 0.25) < 0.02, `std ${std}`);
    g.dispose();
    model.dispose();
  });

  it('LoRA-FA trains B only and records itself in the safetensors metadata', async () => {
    const model = tinyModel();
    const adapter = createAdapter(model, [{ method: 'lora_fa', r: 2, targetModules: ['q_proj'] }]);
    assert.ok([...adapter.trainableVariables().keys()].every((k) => k.endsWith('lora_B.weight')));
    assert.equal(adapter.state().size, 6);
    const dir = await tempDir();
    await saveAdapter(adapter, dir);
    const file = await readSafetensorsFile(join(dir, 'adapter_model.safetensors'));
    assert.deepEqual(file.metadata, { format: 'pt', tandem_method: 'lora_fa' });
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    assert.equal(config.peft_type, 'LORA');
    const loaded = await loadAdapter(model, dir);
    assert.equal(loaded.methods[0].method.name, 'lora_fa');
    loaded.dispose();
    adapter.dispose();
    model.dispose();
  });

  it('dropout masks come from the seed: same seed, same training forward', () => {
    const model = tinyModel();
    const run = (): Float32Array => {
      const adapter = createAdapter(model, [{ method: 'lora', loraDropout: 0.5, initLoraWeights: false }], { seed: 9 });
      const out = tf.tidy(() => model.forward(tf.tensor2d(IDS, undefined, 'int32'), { hooks: adapter.hooks, training: true }).dataSync() as Float32Array);
      adapter.dispose();
      return out;
    };
    assert.deepEqual(run(), run());
    model.dispose();
  });
});

describe('prompt tuning', () => {
  it('returns logits for the real tokens only and prepends the prompt once with a KV cache', () => {
    const model = tinyModel();
    const adapter = createAdapter(model, [{ method: 'prompt_tuning', numVirtualTokens: 4, promptTuningInit: 'TEXT', initTokenIds: [5, 6, 7], promptTuningInitText: 'five six seven', tokenizerNameOrPath: 'org/tiny' }]);
    assert.equal(adapter.numVirtualTokens, 4);
    const full = logits(model, adapter);
    assert.equal(full.length, IDS.length * IDS[0].length * 32);
    // Prefill 5 tokens, then 3 one by one: the last logits match the single pass.
    const cache = new KvCache();
    const ids = [IDS[0]];
    const step = tf.tidy(() => {
      tf.dispose(model.forward(tf.tensor2d([ids[0].slice(0, 5)], undefined, 'int32'), { hooks: adapter.hooks, cache }));
      let last: tf.Tensor | undefined;
      for (let t = 5; t < 8; t++) last = model.forward(tf.tensor2d([[ids[0][t]]], undefined, 'int32'), { hooks: adapter.hooks, cache });
      return last!.dataSync() as Float32Array;
    });
    assertClose(step, full.slice(7 * 32, 8 * 32), 1e-4, 'cached decoding vs one pass');
    assert.equal(cache.length, 4 + 8);
    cache.dispose();
    // TEXT init: the prompt is the text's embeddings, repeated to its length.
    const prompt = adapter.state().get('prompt_embeddings')!.variable.arraySync() as number[][];
    const embed = model.weight('model.embed_tokens.weight').arraySync() as number[][];
    assert.deepEqual(prompt.map((row) => Array.from(Float32Array.from(row))), [5, 6, 7, 5].map((t) => Array.from(Float32Array.from(embed[t]))));
    adapter.dispose();
    model.dispose();
  });
});

describe('on-disk names', () => {
  const save = async (specs: Parameters<typeof createAdapter>[1], model = tinyModel()) => {
    const adapter = createAdapter(model, specs);
    const dir = await tempDir();
    await saveAdapter(adapter, dir, { baseModel: 'org/tiny' });
    adapter.dispose();
    model.dispose();
    return {
      config: JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>,
      tensors: (await readSafetensorsFile(join(dir, 'adapter_model.safetensors'))).tensors,
      dir,
    };
  };

  it('LoRA and DoRA: PEFT fields and keys', async () => {
    const { config, tensors } = await save([{ method: 'dora', r: 2, loraAlpha: 4, targetModules: ['q_proj'], layersToTransform: [0] }]);
    assert.deepEqual(
      { peft_type: config.peft_type, r: config.r, lora_alpha: config.lora_alpha, target_modules: config.target_modules, use_dora: config.use_dora, use_rslora: config.use_rslora, bias: config.bias, fan_in_fan_out: config.fan_in_fan_out, task_type: config.task_type, base_model_name_or_path: config.base_model_name_or_path, init_lora_weights: config.init_lora_weights, layers_to_transform: config.layers_to_transform, modules_to_save: config.modules_to_save, lora_dropout: config.lora_dropout },
      { peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'], use_dora: true, use_rslora: false, bias: 'none', fan_in_fan_out: false, task_type: 'CAUSAL_LM', base_model_name_or_path: 'org/tiny', init_lora_weights: true, layers_to_transform: [0], modules_to_save: null, lora_dropout: 0 },
    );
    assert.deepEqual(Object.fromEntries([...tensors].map(([k, t]) => [k, t.shape])), {
      'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': [2, 16],
      'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight': [16, 2],
      'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector': [16],
    });
  });

  it('VeRA, IA3 and prompt tuning: PEFT keys and shapes', async () => {
    const v = await save([{ method: 'vera', r: 4, targetModules: ['q_proj', 'v_proj'], layersToTransform: [1] }]);
    assert.equal(v.config.peft_type, 'VERA');
    assert.equal(v.config.save_projection, true);
    assert.deepEqual(Object.fromEntries([...v.tensors].map(([k, t]) => [k, t.shape])), {
      'base_model.vera_A': [4, 16],
      'base_model.vera_B': [16, 4],
      'base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_b': [16],
      'base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_d': [4],
      'base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_b': [8],
      'base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d': [4],
    });
    const i = await save([{ method: 'ia3', layersToTransform: [0] }]);
    assert.equal(i.config.peft_type, 'IA3');
    assert.equal(i.config.layers_to_transform, undefined, 'folded into the target_modules regex');
    assert.deepEqual(i.config.feedforward_modules, ['down_proj']);
    assert.deepEqual(Object.fromEntries([...i.tensors].map(([k, t]) => [k, t.shape])), {
      'base_model.model.model.layers.0.self_attn.k_proj.ia3_l': [8, 1],
      'base_model.model.model.layers.0.self_attn.v_proj.ia3_l': [8, 1],
      'base_model.model.model.layers.0.mlp.down_proj.ia3_l': [1, 24],
    });
    const p = await save([{ method: 'prompt_tuning', numVirtualTokens: 5 }]);
    assert.equal(p.config.peft_type, 'PROMPT_TUNING');
    assert.equal(p.config.num_virtual_tokens, 5);
    assert.deepEqual([...p.tensors].map(([k, t]) => [k, t.shape]), [['prompt_embeddings', [5, 16]]]);
  });

  it('Tandem formats: bottleneck, BitFit, block and combinations', async () => {
    const b = await save([{ method: 'bottleneck', bottleneckSize: 4, sublayers: ['mlp'], layersToTransform: [2] }]);
    assert.equal(b.config.peft_type, 'TANDEM_BOTTLENECK');
    assert.deepEqual([...b.tensors.keys()].sort(), ['adapter_down.bias', 'adapter_down.weight', 'adapter_up.bias', 'adapter_up.weight'].map((s) => `base_model.model.model.layers.2.mlp.${s}`));
    const f = await save([{ method: 'bitfit', layersToTransform: [0] }], tinyModel(QWEN2));
    assert.deepEqual([...f.tensors.keys()].sort(), ['k_proj', 'q_proj', 'v_proj'].map((m) => `base_model.model.model.layers.0.self_attn.${m}.bias`));
    const k = await save([{ method: 'block', layersToTransform: [1] }]);
    assert.equal(k.config.peft_type, 'TANDEM_BLOCK');
    assert.ok(k.tensors.has('model.layers.1.self_attn.q_proj.weight'));
    assert.equal(k.tensors.size, 9);
    const c = await save([{ method: 'lora', layersToTransform: [2] }, { method: 'prompt_tuning', numVirtualTokens: 2 }]);
    assert.equal(c.config.peft_type, 'TANDEM');
    assert.deepEqual((c.config.methods as Record<string, unknown>[]).map((m) => [m.tandem_method, m.peft_type]), [['lora', 'LORA'], ['prompt_tuning', 'PROMPT_TUNING']]);
  });

  it('loading names the file and tensor that are wrong', async () => {
    const model = tinyModel();
    const { dir } = await save([{ method: 'lora', r: 2, targetModules: ['q_proj'], layersToTransform: [0] }]);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    const { writeFile } = await import('node:fs/promises');
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, r: 3 }));
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_TENSOR_SHAPE_MISMATCH', 'adapter_model.safetensors', 'lora_A.weight');
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, target_modules: ['q_proj', 'k_proj'] }));
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_TENSOR_MISSING', 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight');
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, layers_to_transform: null, target_modules: 'model\\.layers\\.1\\.self_attn\\.q_proj' }));
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_TENSOR_MISSING', 'layers.1');
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, peft_type: 'LOHA' }));
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_PEFT_METHOD_UNKNOWN', 'LOHA', 'adapter_config.json');
    await writeFile(join(dir, 'adapter_config.json'), '{"peft_type": ');
    await rejectsModelError(loadAdapter(model, dir), 'TANDEM_ADAPTER_INVALID', 'adapter_config.json');
    await rejectsModelError(loadAdapter(model, join(dir, 'nope')), 'TANDEM_MODEL_FILE_MISSING', 'adapter_config.json');
    assert.equal(model.weights.get('model.layers.0.self_attn.q_proj.weight')!.trainable, false);
    model.dispose();
  });
});
