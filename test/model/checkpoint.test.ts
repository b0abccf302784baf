import assert from 'node:assert/strict';
import { copyFile, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  expectedTensorShapes,
  fromFloat32,
  loadModelFolder,
  parseModelConfig,
  readSafetensorsFile,
  saveModelFolder,
  toFloat32,
  writeSafetensorsFile,
  writeShardedSafetensors,
} from '../../model/index.ts';
import type { LoadedModel, SafetensorsTensor, SafetensorsTensorInput, Weight } from '../../model/index.ts';
import { STORIES_DIR, rejectsModelError, tempDir } from './helpers.ts';

async function storiesConfig(): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(STORIES_DIR, 'config.json'), 'utf8')) as Record<string, unknown>;
}

async function storiesTensors(): Promise<Map<string, SafetensorsTensorInput>> {
  return new Map((await readSafetensorsFile(join(STORIES_DIR, 'model.safetensors'))).tensors);
}

/** A model folder in a temporary directory from a config and tensors, with the fixture's tokenizer. */
async function folderWith(config: Record<string, unknown>, tensors: Map<string, SafetensorsTensorInput>): Promise<string> {
  const dir = await tempDir();
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  await writeSafetensorsFile(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  return dir;
}

function assertSameWeights(a: LoadedModel, b: LoadedModel): void {
  assert.deepEqual([...a.weights.keys()], [...b.weights.keys()]);
  for (const [name, w] of a.weights) {
    const v = b.weights.get(name) as Weight;
    assert.deepEqual(v.shape, w.shape, name);
    assert.ok(Buffer.from(v.data.buffer, v.data.byteOffset, v.data.byteLength).equals(Buffer.from(w.data.buffer, w.data.byteOffset, w.data.byteLength)), name);
  }
}

describe('loading a Hugging Face model folder', () => {
  test('stories260K loads every expected weight with its shape and the stored values', async () => {
    const model = await loadModelFolder(STORIES_DIR);
    assert.equal(model.config.modelType, 'llama');
    assert.equal(model.config.numKeyValueHeads, 4);
    const expected = expectedTensorShapes(model.config);
    assert.equal(model.weights.size, 5 * 9 + 2);
    assert.deepEqual([...model.weights.keys()], [...expected.keys()]);
    for (const [name, shape] of expected) assert.deepEqual(model.weights.get(name)?.shape, shape, name);
    assert.ok(!model.weights.has('lm_head.weight'), 'the tied lm_head is not a separate weight');
    const stored = (await readSafetensorsFile(join(STORIES_DIR, 'model.safetensors'))).tensors.get('model.layers.2.mlp.down_proj.weight') as SafetensorsTensor;
    const w = model.weights.get('model.layers.2.mlp.down_proj.weight') as Weight;
    assert.equal(w.data.length, 64 * 172);
    assert.deepEqual(w.data, toFloat32(stored, 'x', 'x'));
    assert.equal(model.tokenizerPath, join(STORIES_DIR, 'tokenizer.json'));
    assert.match(model.contentHash, /^[0-9a-f]{64}$/);
    assert.equal((await loadModelFolder(STORIES_DIR)).contentHash, model.contentHash);
  });

  test('a sharded copy (>= 3 shards, written by saveModelFolder) loads to identical weights and the same hash', async () => {
    const original = await loadModelFolder(STORIES_DIR);
    const dir = await tempDir();
    await saveModelFolder(dir, original.config.raw, original.weights, {
      maxShardBytes: 300_000,
      copyFiles: [join(STORIES_DIR, 'tokenizer.json'), join(STORIES_DIR, 'tokenizer_config.json')],
    });
    const files = (await readdir(dir)).sort();
    const shards = files.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f));
    assert.ok(shards.length >= 3, `expected at least 3 shards, got ${files.join(', ')}`);
    assert.ok(!files.includes('model.safetensors'));
    assert.ok(files.includes('tokenizer.json') && files.includes('tokenizer_config.json'));
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    assert.equal(Object.keys(index.weight_map).length, original.weights.size);
    assert.equal(index.metadata.total_size, 260_032 * 4);
    const sharded = await loadModelFolder(dir);
    assertSameWeights(original, sharded);
    assert.equal(sharded.contentHash, original.contentHash);
    assert.equal(sharded.tokenizerPath, join(dir, 'tokenizer.json'));
  });

  test('saved unsharded, the folder loads the same; the hash ignores storage details but not values or architecture', async () => {
    const original = await loadModelFolder(STORIES_DIR);
    const dir = await tempDir();
    await saveModelFolder(dir, original.config.raw, original.weights);
    const again = await loadModelFolder(dir);
    assertSameWeights(original, again);
    assert.equal(again.contentHash, original.contentHash);
    assert.equal((await readSafetensorsFile(join(dir, 'model.safetensors'))).tensors.size, original.weights.size);

    const changed = new Map(original.weights);
    const norm = changed.get('model.norm.weight') as Weight;
    const data = norm.data.slice();
    data[0] += 1e-3;
    changed.set('model.norm.weight', { shape: norm.shape, data });
    const dir2 = await tempDir();
    await saveModelFolder(dir2, original.config.raw, changed);
    assert.notEqual((await loadModelFolder(dir2)).contentHash, original.contentHash);

    const dir3 = await tempDir();
    await saveModelFolder(dir3, { ...original.config.raw, rope_theta: 500000 }, original.weights);
    assert.notEqual((await loadModelFolder(dir3)).contentHash, original.contentHash);
  });

  test('the same values stored as BF16 and as F32 hash the same', async () => {
    const original = await loadModelFolder(STORIES_DIR);
    const rounded = new Map<string, Weight>();
    for (const [name, w] of original.weights) {
      rounded.set(name, { shape: w.shape, data: toFloat32({ dtype: 'BF16', shape: w.shape, data: fromFloat32(w.data, 'BF16') }, 'x', name) });
    }
    const asF32 = await tempDir();
    const asBF16 = await tempDir();
    await saveModelFolder(asF32, original.config.raw, rounded);
    await saveModelFolder(asBF16, original.config.raw, rounded, { dtype: 'BF16' });
    const a = await loadModelFolder(asF32);
    const b = await loadModelFolder(asBF16);
    assert.equal((await readSafetensorsFile(join(asBF16, 'model.safetensors'))).tensors.get('model.norm.weight')?.dtype, 'BF16');
    assertSameWeights(a, b);
    assert.equal(a.contentHash, b.contentHash);
    assert.notEqual(a.contentHash, original.contentHash);
  });

  test('a whole model saved in F16 loads within float16 rounding of the F32 one', async () => {
    const original = await loadModelFolder(STORIES_DIR);
    const dir = await tempDir();
    await saveModelFolder(dir, original.config.raw, original.weights, { dtype: 'F16' });
    assert.equal((await readSafetensorsFile(join(dir, 'model.safetensors'))).tensors.get('model.embed_tokens.weight')?.dtype, 'F16');
    const half = await loadModelFolder(dir);
    let worst = 0;
    for (const [name, w] of original.weights) {
      const h = (half.weights.get(name) as Weight).data;
      for (let i = 0; i < w.data.length; i++) {
        const err = Math.abs(h[i] - w.data[i]);
        // Half of a float16 ulp: relative 2^-11 for normals, absolute 2^-25 for subnormals.
        assert.ok(err <= Math.max(Math.abs(w.data[i]) * 2 ** -11, 2 ** -25), `${name}[${i}]: ${w.data[i]} -> ${h[i]}`);
        worst = Math.max(worst, err);
      }
    }
    assert.ok(worst > 0, 'F16 should actually round something');
  });

  test('F16 and BF16 tensors in a checkpoint load to their exact values', async () => {
    const tensors = await storiesTensors();
    const f16 = new Uint16Array(64).fill(0x3c00);
    f16.set([0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00, 0x8000]);
    tensors.set('model.norm.weight', { dtype: 'F16', shape: [64], data: f16 });
    const bf16 = new Uint16Array(64).fill(0x3f80);
    bf16.set([0x3f80, 0x4049, 0xc000]);
    tensors.set('model.layers.0.input_layernorm.weight', { dtype: 'BF16', shape: [64], data: bf16 });
    const model = await loadModelFolder(await folderWith(await storiesConfig(), tensors));
    assert.deepEqual([...(model.weights.get('model.norm.weight') as Weight).data.slice(0, 7)], [1, -2, 65504, 2 ** -24, Infinity, -0, 1]);
    assert.deepEqual([...(model.weights.get('model.layers.0.input_layernorm.weight') as Weight).data.slice(0, 4)], [1, 3.140625, -2, 1]);
  });

  test('tensors older transformers stored (rotary inv_freq) are skipped', async () => {
    const tensors = await storiesTensors();
    tensors.set('model.layers.0.self_attn.rotary_emb.inv_freq', { dtype: 'F32', shape: [4], data: new Float32Array(4) });
    const model = await loadModelFolder(await folderWith(await storiesConfig(), tensors));
    assert.ok(!model.weights.has('model.layers.0.self_attn.rotary_emb.inv_freq'));
  });
});

describe('model folders that cannot be loaded are refused with a typed error naming file and tensor', () => {
  test('no config.json', async () => {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'model.safetensors'), join(dir, 'model.safetensors'));
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_MODEL_FILE_MISSING', join(dir, 'config.json'));
  });

  test('config.json that is not JSON', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'config.json'), '{"model_type": ');
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_MODEL_CONFIG_INVALID', join(dir, 'config.json'));
  });

  test('an unsupported model_type, named', async () => {
    const dir = await folderWith({ ...(await storiesConfig()), model_type: 'gpt2' }, await storiesTensors());
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_MODEL_TYPE_UNSUPPORTED', '"gpt2"', join(dir, 'config.json'));
  });

  test('neither model.safetensors nor an index', async () => {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'config.json'), join(dir, 'config.json'));
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_MODEL_FILE_MISSING', join(dir, 'model.safetensors'));
  });

  test('a truncated model.safetensors', async () => {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'config.json'), join(dir, 'config.json'));
    const bytes = await readFile(join(STORIES_DIR, 'model.safetensors'));
    await writeFile(join(dir, 'model.safetensors'), bytes.subarray(0, 500_000));
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_SAFETENSORS_TRUNCATED', join(dir, 'model.safetensors'));
  });

  test('a missing tensor', async () => {
    const tensors = await storiesTensors();
    tensors.delete('model.layers.3.mlp.up_proj.weight');
    const dir = await folderWith(await storiesConfig(), tensors);
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_TENSOR_MISSING', 'model.layers.3.mlp.up_proj.weight', dir);
  });

  test('a tensor of the wrong shape, including a tied lm_head', async () => {
    const tensors = await storiesTensors();
    tensors.set('model.norm.weight', { dtype: 'F32', shape: [63], data: new Float32Array(63) });
    const dir = await folderWith(await storiesConfig(), tensors);
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_TENSOR_SHAPE_MISMATCH', 'tensor model.norm.weight', join(dir, 'model.safetensors'), '[63]', '[64]');

    const tied = await storiesTensors();
    tied.set('lm_head.weight', { dtype: 'F32', shape: [511, 64], data: new Float32Array(511 * 64) });
    const dir2 = await folderWith(await storiesConfig(), tied);
    await rejectsModelError(loadModelFolder(dir2), 'TANDEM_TENSOR_SHAPE_MISMATCH', 'tensor lm_head.weight', join(dir2, 'model.safetensors'));
  });

  test('an untied config requires lm_head.weight; the fixture has one, so it loads', async () => {
    const model = await loadModelFolder(await folderWith({ ...(await storiesConfig()), tie_word_embeddings: false }, await storiesTensors()));
    assert.deepEqual(model.weights.get('lm_head.weight')?.shape, [512, 64]);
    const tensors = await storiesTensors();
    tensors.delete('lm_head.weight');
    await rejectsModelError(loadModelFolder(await folderWith({ ...(await storiesConfig()), tie_word_embeddings: false }, tensors)), 'TANDEM_TENSOR_MISSING', 'lm_head.weight');
  });

  test('a tensor the architecture does not have', async () => {
    const tensors = await storiesTensors();
    tensors.set('model.layers.0.self_attn.q_proj.bias', { dtype: 'F32', shape: [64], data: new Float32Array(64) });
    const dir = await folderWith(await storiesConfig(), tensors);
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_TENSOR_UNEXPECTED', 'tensor model.layers.0.self_attn.q_proj.bias', join(dir, 'model.safetensors'));
  });

  test('a header naming more tensors than any checkpoint of the config has: refused before it is parsed', async () => {
    const config = await storiesConfig();
    const tensors = await storiesTensors();
    // What the config needs, a rotary table per layer (5) and a tied lm_head: the most allowed.
    const allowed = expectedTensorShapes(parseModelConfig(config)).size + 5 + 1;
    for (let i = 0; tensors.size <= allowed; i++) tensors.set(`extra.${i}`, { dtype: 'F32', shape: [1], data: new Float32Array(1) });
    const dir = await folderWith(config, tensors);
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_SAFETENSORS_INVALID', `more than ${allowed} tensors`, join(dir, 'model.safetensors'));
  });

  test('an integer dtype for a weight', async () => {
    const tensors = await storiesTensors();
    tensors.set('model.norm.weight', { dtype: 'I32', shape: [64], data: new Int32Array(64) });
    const dir = await folderWith(await storiesConfig(), tensors);
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_TENSOR_DTYPE_UNSUPPORTED', 'tensor model.norm.weight', join(dir, 'model.safetensors'));
  });
});

describe('sharded checkpoints that cannot be loaded', () => {
  async function shardedFolder(): Promise<string> {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'config.json'), join(dir, 'config.json'));
    await writeShardedSafetensors(dir, await storiesTensors(), { maxShardBytes: 400_000 });
    return dir;
  }

  async function editIndex(dir: string, edit: (weightMap: Record<string, string>) => void): Promise<void> {
    const path = join(dir, 'model.safetensors.index.json');
    const index = JSON.parse(await readFile(path, 'utf8')) as { weight_map: Record<string, string> };
    edit(index.weight_map);
    await writeFile(path, JSON.stringify(index));
  }

  test('the sharded fixture loads (control)', async () => {
    const dir = await shardedFolder();
    assert.equal((await loadModelFolder(dir)).contentHash, (await loadModelFolder(STORIES_DIR)).contentHash);
  });

  test('a shard named in the index is missing', async () => {
    const dir = await shardedFolder();
    const shard = (await readdir(dir)).filter((f) => f.startsWith('model-')).sort()[1];
    await rm(join(dir, shard));
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_MODEL_FILE_MISSING', join(dir, shard));
  });

  test('shard names that leave the folder', async () => {
    for (const evil of ['../model.safetensors', '/etc/passwd', 'sub/model-00001-of-00003.safetensors', '..', '']) {
      const dir = await shardedFolder();
      await editIndex(dir, (m) => (m['model.norm.weight'] = evil));
      await rejectsModelError(loadModelFolder(dir), 'TANDEM_SHARD_INDEX_INVALID', join(dir, 'model.safetensors.index.json'), 'tensor model.norm.weight');
    }
  });

  test('an index naming more tensors than any checkpoint of the config has', async () => {
    const dir = await shardedFolder();
    const shard = (await readdir(dir)).filter((f) => f.startsWith('model-')).sort()[0];
    await editIndex(dir, (m) => {
      for (let i = 0; i < 100; i++) m[`extra.${i}`] = shard;
    });
    const allowed = expectedTensorShapes(parseModelConfig(await storiesConfig())).size + 5 + 1;
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_SHARD_INDEX_INVALID', `at most ${allowed}`);
  });

  test('an index that is not an object with a weight_map', async () => {
    const dir = await shardedFolder();
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {} }));
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_SHARD_INDEX_INVALID', 'weight_map');
  });

  test('an index that disagrees with the shards', async () => {
    const dir = await shardedFolder();
    const shards = (await readdir(dir)).filter((f) => f.startsWith('model-')).sort();
    await editIndex(dir, (m) => {
      const name = Object.keys(m).find((k) => m[k] === shards[0]) as string;
      m[name] = shards[1];
    });
    await rejectsModelError(loadModelFolder(dir), 'TANDEM_SHARD_INDEX_INVALID', shards[0]);
  });

  test('saveModelFolder refuses weights that do not fit the configuration, and writes nothing', async () => {
    const original = await loadModelFolder(STORIES_DIR);
    const weights = new Map(original.weights);
    weights.delete('model.layers.1.self_attn.v_proj.weight');
    const dir = await tempDir();
    await rejectsModelError(saveModelFolder(dir, original.config.raw, weights), 'TANDEM_TENSOR_MISSING', 'model.layers.1.self_attn.v_proj.weight');
    assert.deepEqual(await readdir(dir), []);
    assert.equal(parseModelConfig(original.config.raw).numHiddenLayers, 5);
  });
});
