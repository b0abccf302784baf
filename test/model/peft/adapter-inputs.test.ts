// Hostile adapter inputs: the sizes an adapter_config.json (or a spec) states are bounded by the
// model, the bytes the adapter would allocate are estimated from the configuration alone and
// held to a limit, and the weights file's header is compared with the declared tensors, all
// before any method's `create` allocates a tensor. A rank, a prompt length or a bottleneck of
// millions used to allocate and randomly fill gigabytes before the weights were looked at.
import assert from 'node:assert/strict';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ModelError, serializeSafetensors } from '../../../model/index.ts';
import type { LlamaModel } from '../../../model/llama/llama.ts';
import * as peft from '../../../model/peft/index.ts';
import { BUILTIN_METHODS, MethodRegistry, createAdapter, loadAdapter, lora, saveAdapter } from '../../../model/peft/index.ts';
import type { MethodSpec, PeftMethod } from '../../../model/peft/index.ts';
import { api, createTenantKey, startTestNode } from '../../cloud-node/helpers.ts';
import type { TestNode } from '../../cloud-node/helpers.ts';
import { tempDir } from '../helpers.ts';
import { QWEN2, tinyModel } from './helpers.ts';

/** The most the heap and the array buffers may grow while a hostile input is refused. */
const MAX_GROWTH_BYTES = 64 * 1024 * 1024;

/**
 * The built-in methods with `create` counted: a refusal "before anything is allocated" means
 * create never ran. Memory is sampled right after each create, where an allocation peaks.
 */
function spied(): { registry: MethodRegistry; creates: () => number; samples: NodeJS.MemoryUsage[] } {
  let n = 0;
  const samples: NodeJS.MemoryUsage[] = [];
  const methods = BUILTIN_METHODS.map((m): PeftMethod => ({
    ...m,
    create: (model, config, ctx) => {
      n++;
      const instance = m.create(model, config, ctx);
      samples.push(process.memoryUsage());
      return instance;
    },
  }));
  return { registry: new MethodRegistry(methods), creates: () => n, samples };
}

/** Runs `f` and returns what it threw and the largest growth of heapUsed and arrayBuffers seen. */
async function refusal(f: () => unknown, samples: NodeJS.MemoryUsage[]): Promise<{ err: unknown; heap: number; arrayBuffers: number }> {
  const m0 = process.memoryUsage();
  let err: unknown;
  try {
    const out = await f();
    (out as { dispose?: () => void } | undefined)?.dispose?.();
  } catch (e) {
    err = e;
  }
  const seen = [...samples, process.memoryUsage()];
  return {
    err,
    heap: Math.max(...seen.map((m) => m.heapUsed - m0.heapUsed)),
    arrayBuffers: Math.max(...seen.map((m) => m.arrayBuffers - m0.arrayBuffers)),
  };
}

function assertModelError(err: unknown, code: string, ...mentions: string[]): void {
  assert.ok(err instanceof ModelError, `expected a ModelError ${code}, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  for (const m of mentions) assert.ok(err.message.includes(m), `message should name ${JSON.stringify(m)}: ${err.message}`);
}

let model: LlamaModel;
/** A real small adapter: LoRA r = 2 on layer 0's q_proj. */
let adapterDir = '';
let baseConfig: Record<string, unknown> = {};
let weights: Uint8Array;

before(async () => {
  model = tinyModel();
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj'], layersToTransform: [0] }], { seed: 1 });
  adapterDir = await tempDir();
  await saveAdapter(adapter, adapterDir);
  adapter.dispose();
  baseConfig = JSON.parse(await readFile(join(adapterDir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  weights = await readFile(join(adapterDir, 'adapter_model.safetensors'));
});

after(() => model.dispose());

/** An adapter folder with this config and the small real weights (or others). */
async function folder(config: Record<string, unknown>, weightBytes: Uint8Array = weights): Promise<string> {
  const dir = await tempDir();
  await writeFile(join(dir, 'adapter_config.json'), JSON.stringify(config));
  await writeFile(join(dir, 'adapter_model.safetensors'), weightBytes);
  return dir;
}

describe('sizes an adapter_config.json states are bounded by the model before anything is allocated', () => {
  // tinyModel: hidden 16, intermediate 24, q_proj [16, 16], 3 layers, 2048 positions. Each value
  // below made loading allocate and fill about 256 MB before the weights were compared.
  const cases: { name: string; config: Record<string, unknown>; field: string; value: string; limit: string }[] = [
    { name: 'LoRA r = 2,000,000', config: { r: 2_000_000 }, field: 'r', value: '2000000', limit: '16' },
    {
      name: 'VeRA r = 2,000,000',
      config: { peft_type: 'VERA', r: 2_000_000, target_modules: ['q_proj'], layers_to_transform: [0] },
      field: 'r',
      value: '2000000',
      limit: '256',
    },
    { name: 'prompt tuning num_virtual_tokens = 4,000,000', config: { peft_type: 'PROMPT_TUNING', num_virtual_tokens: 4_000_000, task_type: 'CAUSAL_LM' }, field: 'num_virtual_tokens', value: '4000000', limit: '2048' },
    { name: 'bottleneck_size = 2,000,000', config: { peft_type: 'TANDEM_BOTTLENECK', bottleneck_size: 2_000_000, sublayers: ['mlp'], layers_to_transform: [0] }, field: 'bottleneck_size', value: '2000000', limit: '24' },
  ];
  for (const c of cases) {
    it(`${c.name} is TANDEM_PEFT_CONFIG_INVALID naming ${c.field} and the limit, and the heap stays small`, async () => {
      const config = c.config.peft_type === undefined ? { ...baseConfig, ...c.config } : c.config;
      const dir = await folder(config);
      const spy = spied();
      const { err, heap, arrayBuffers } = await refusal(() => loadAdapter(model, dir, { registry: spy.registry }), spy.samples);
      assertModelError(err, 'TANDEM_PEFT_CONFIG_INVALID', c.field, c.value, `over the limit of ${c.limit}`, 'adapter_config.json');
      assert.equal(spy.creates(), 0, 'no method was created');
      assert.ok(heap < MAX_GROWTH_BYTES, `heapUsed grew ${heap} bytes`);
      assert.ok(arrayBuffers < MAX_GROWTH_BYTES, `arrayBuffers grew ${arrayBuffers} bytes`);
    });
  }

  it('a spec (a --method flag, a split run\'s middle LoRA) with a huge rank is refused by createAdapter the same way', async () => {
    const spy = spied();
    const { err, heap, arrayBuffers } = await refusal(() => createAdapter(model, [{ method: 'lora', r: 2_000_000, targetModules: ['q_proj'], layersToTransform: [0] }], { registry: spy.registry }), spy.samples);
    assertModelError(err, 'TANDEM_PEFT_CONFIG_INVALID', 'r is 2000000', 'over the limit of 16');
    assert.equal(spy.creates(), 0);
    assert.ok(heap < MAX_GROWTH_BYTES && arrayBuffers < MAX_GROWTH_BYTES, `grew heap ${heap}, arrayBuffers ${arrayBuffers}`);
  });

  it('sizes within the bounds whose tensors together pass the allocation limit are TANDEM_ADAPTER_TOO_LARGE naming bytes and limit', async () => {
    const dir = await folder({ ...baseConfig, r: 16, target_modules: 'all-linear', layers_to_transform: null });
    const spy = spied();
    const { err } = await refusal(() => loadAdapter(model, dir, { registry: spy.registry, maxAllocationBytes: 16 * 1024 }), spy.samples);
    assertModelError(err, 'TANDEM_ADAPTER_TOO_LARGE', 'over the limit of 16384 bytes');
    assert.equal(spy.creates(), 0);
    const specSpy = spied();
    assert.throws(() => createAdapter(model, [{ method: 'lora', r: 16, targetModules: 'all-linear' }], { registry: specSpy.registry, maxAllocationBytes: 16 * 1024 }), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_ADAPTER_TOO_LARGE');
    assert.equal(specSpy.creates(), 0);
  });
});

describe('the weights file header is compared with the declared tensors before instantiation', () => {
  it('a tensor the configuration declares but the file lacks is TANDEM_TENSOR_MISSING, and no method is created', async () => {
    const dir = await folder({ ...baseConfig, target_modules: ['q_proj', 'k_proj'] });
    const spy = spied();
    const { err } = await refusal(() => loadAdapter(model, dir, { registry: spy.registry }), spy.samples);
    assertModelError(err, 'TANDEM_TENSOR_MISSING', 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight', 'adapter_model.safetensors');
    assert.equal(spy.creates(), 0);
  });

  it('a mis-shaped tensor (the reviewer\'s zero-byte [r, 0]) is TANDEM_TENSOR_SHAPE_MISMATCH, and no method is created', async () => {
    const zero = serializeSafetensors(new Map([
      ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', { dtype: 'F32' as const, shape: [16, 0], data: new Float32Array(0) }],
      ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', { dtype: 'F32' as const, shape: [16, 0], data: new Float32Array(0) }],
    ]));
    const dir = await folder({ ...baseConfig, r: 16 }, zero);
    const spy = spied();
    const { err } = await refusal(() => loadAdapter(model, dir, { registry: spy.registry }), spy.samples);
    assertModelError(err, 'TANDEM_TENSOR_SHAPE_MISMATCH', 'lora_A.weight', '[16,16]', '[16,0]');
    assert.equal(spy.creates(), 0);
  });

  it('a 2 GiB weights file whose header does not match is refused from its header alone: the data is never read', async () => {
    // A valid header whose q_proj lora_A is [2, 2^28] F32 (2 GiB) where the config declares [2, 16],
    // over a sparse file: reading the data would take 2 GiB of memory.
    const bigBytes = 2 ** 31;
    const header = Buffer.from(JSON.stringify({
      'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': { dtype: 'F32', shape: [2, 2 ** 28], data_offsets: [0, bigBytes] },
      'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight': { dtype: 'F32', shape: [16, 2], data_offsets: [bigBytes, bigBytes + 128] },
    }).padEnd(8 * 64, ' '));
    const prefix = new Uint8Array(8);
    new DataView(prefix.buffer).setBigUint64(0, BigInt(header.byteLength), true);
    const dir = await folder(baseConfig, Buffer.concat([prefix, header]));
    await truncate(join(dir, 'adapter_model.safetensors'), 8 + header.byteLength + bigBytes + 128);
    const spy = spied();
    // Sampled while the refusal is under way too: a data read would show as a peak, freed or not.
    const sampler = setInterval(() => spy.samples.push(process.memoryUsage()), 2);
    const { err, heap, arrayBuffers } = await refusal(() => loadAdapter(model, dir, { registry: spy.registry }), spy.samples).finally(() => clearInterval(sampler));
    assertModelError(err, 'TANDEM_TENSOR_SHAPE_MISMATCH', 'lora_A.weight', '[2,16]', `[2,${2 ** 28}]`, 'adapter_model.safetensors');
    assert.equal(spy.creates(), 0);
    assert.ok(heap < MAX_GROWTH_BYTES, `heapUsed grew ${heap} bytes`);
    assert.ok(arrayBuffers < MAX_GROWTH_BYTES, `arrayBuffers grew ${arrayBuffers} bytes`);
  });

  it('the real small adapter still loads (one create), and what each of the nine methods declares is what it creates', async () => {
    const spy = spied();
    const loaded = await loadAdapter(model, adapterDir, { registry: spy.registry });
    assert.equal(spy.creates(), 1);
    loaded.dispose();
    assert.equal(typeof peft.planAdapterConfigs, 'function', 'model/peft plans adapters');
    const specs: [MethodSpec, typeof model | 'qwen2'][] = [
      [{ method: 'lora', r: 4, targetModules: 'all-linear' }, model],
      [{ method: 'dora', r: 3, targetModules: ['q_proj', 'down_proj'] }, model],
      [{ method: 'lora_fa', r: 2, targetModules: ['v_proj'] }, model],
      [{ method: 'vera', r: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] }, model],
      [{ method: 'ia3' }, model],
      [{ method: 'prompt_tuning', numVirtualTokens: 3 }, model],
      [{ method: 'bottleneck', bottleneckSize: 4, sublayers: ['mlp'] }, model],
      [{ method: 'bitfit' }, 'qwen2'],
      [{ method: 'block', layersToTransform: [0, 2] }, model],
    ];
    for (const [spec, which] of specs) {
      const m = which === 'qwen2' ? tinyModel(QWEN2) : which;
      const registry = peft.defaultRegistry();
      const method = registry.get(spec.method);
      const { method: _name, ...fields } = spec;
      const plan = peft.planAdapterConfigs(m, [{ method, config: method.fromSpec(fields) }]);
      const adapter = createAdapter(m, [spec]);
      const state = [...adapter.state()].map(([key, s]) => [key, s.variable.shape]);
      assert.deepEqual([...plan.tensors], state, `${spec.method}: declared = created`);
      assert.equal(plan.bytes, state.reduce((n, [, shape]) => n + (shape as number[]).reduce((a, d) => a * d, 1) * 4, 0), `${spec.method}: bytes`);
      adapter.dispose();
      if (m !== model) m.dispose();
    }
  });
});

describe('an upload to a real cloud node (stories260K: hidden 64, intermediate 172)', () => {
  let node: TestNode;
  let key = '';
  let contentHash = '';
  before(async () => {
    node = await startTestNode();
    key = await createTenantKey(node, 'mallory');
    const models = await api(node, 'GET', '/v1/models', key);
    contentHash = ((models.json.models as Record<string, unknown>[])[0]).contentHash as string;
  });

  /** POST /v1/adapters with lora.create counted (the node runs in this process). */
  async function upload(name: string, config: Record<string, unknown>, tensors: Map<string, { dtype: 'F32'; shape: number[]; data: Float32Array }>) {
    const original = lora.create;
    let creates = 0;
    lora.create = (...args) => {
      creates++;
      return original(...args);
    };
    try {
      const res = await api(node, 'POST', '/v1/adapters', key, {
        name, baseContentHash: contentHash, adapter: { config: JSON.stringify(config), weights: Buffer.from(serializeSafetensors(tensors)).toString('base64') },
      });
      return { ...res, creates };
    } finally {
      lora.create = original;
    }
  }

  it('r = max(hidden, intermediate) on all-linear with one zero-byte [r, 0] tensor: TANDEM_ADAPTER_INVALID before anything is created', async () => {
    const res = await upload('a', { peft_type: 'LORA', r: 172, target_modules: 'all-linear' }, new Map([['x', { dtype: 'F32', shape: [172, 0], data: new Float32Array(0) }]]));
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_ADAPTER_INVALID');
    assert.match(String(res.json.message), /lacks it/);
    assert.equal(res.creates, 0, 'the LoRA variables were never allocated');
  });

  it('a rank above the widest module it targets: TANDEM_ADAPTER_TOO_LARGE naming r and the limit', async () => {
    const res = await upload('b', { peft_type: 'LORA', r: 172, target_modules: ['q_proj', 'v_proj'] }, new Map([['x', { dtype: 'F32', shape: [172, 0], data: new Float32Array(0) }]]));
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_ADAPTER_TOO_LARGE');
    assert.match(String(res.json.message), /r = 172, over the limit of 64/);
    assert.equal(res.creates, 0);
    const list = await api(node, 'GET', '/v1/adapters', key);
    assert.deepEqual(list.json.adapters, [], 'nothing was kept');
  });
});
