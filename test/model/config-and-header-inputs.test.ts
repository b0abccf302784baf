// Hostile config.json and safetensors headers: sizes beyond the documented limits, values that
// used to be coerced (a "false" read as true), token ids outside the vocabulary, and headers
// nested deep enough to stall JSON.parse. Each is refused with a typed error, before any work.
import assert from 'node:assert/strict';
import { cp, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { MODEL_CONFIG_LIMITS } from '../../model/config.ts';
import { loadModelFolder, parseModelConfig, parseSafetensors, readSafetensorsFile, serializeSafetensors } from '../../model/index.ts';
import { SAFETENSORS_MAX_HEADER_DEPTH } from '../../model/safetensors.ts';
import { SMOLLM_135M_SHAPE, llamaConfig } from '../../model/testing.ts';
import { STORIES_DIR, rejectsModelError, throwsModelError } from './helpers.ts';

const FIXTURES = join(import.meta.dirname, '..', 'fixtures');

const dirs: string[] = [];
after(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

async function storiesRaw(): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(STORIES_DIR, 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** A copy of stories260K in a fresh temporary folder, its config.json patched. */
async function storiesWith(patch: Record<string, unknown>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-config-inputs-'));
  dirs.push(dir);
  await cp(STORIES_DIR, dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), JSON.stringify({ ...(await storiesRaw()), ...patch }));
  return dir;
}

const base = { model_type: 'llama', hidden_size: 64, intermediate_size: 172, num_hidden_layers: 2, num_attention_heads: 8, num_key_value_heads: 4, vocab_size: 512 };

/** Llama-3.1-405B's config.json, the largest dense model of the family. */
const LLAMA_405B = {
  model_type: 'llama',
  hidden_size: 16384,
  intermediate_size: 53248,
  num_hidden_layers: 126,
  num_attention_heads: 128,
  num_key_value_heads: 8,
  vocab_size: 128256,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  rope_scaling: { factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  tie_word_embeddings: false,
  attention_bias: false,
  mlp_bias: false,
  hidden_act: 'silu',
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
};

/** Qwen2-72B's config.json (the largest vocabulary of the supported families). */
const QWEN2_72B = {
  model_type: 'qwen2',
  hidden_size: 8192,
  intermediate_size: 29568,
  num_hidden_layers: 80,
  num_attention_heads: 64,
  num_key_value_heads: 8,
  vocab_size: 151936,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000,
  tie_word_embeddings: false,
  hidden_act: 'silu',
  bos_token_id: 151643,
  eos_token_id: 151643,
};

describe('config.json sizes are bounded', () => {
  test('each size one over its limit is refused naming the field and the limit; real models and sizes at the limit parse', () => {
    const over: [keyof typeof MODEL_CONFIG_LIMITS, Record<string, unknown>][] = [
      ['num_hidden_layers', { num_hidden_layers: 1025 }],
      ['hidden_size', { hidden_size: 65536 * 2 }],
      ['intermediate_size', { intermediate_size: 262145 }],
      ['num_attention_heads', { hidden_size: 2050 * 2, num_attention_heads: 2050, num_key_value_heads: 1 }],
      ['num_key_value_heads', { num_key_value_heads: 1025 }],
      ['head_dim', { head_dim: 1026 }],
      ['vocab_size', { vocab_size: 2 ** 21 + 1 }],
      ['max_position_embeddings', { max_position_embeddings: 1e15 }],
    ];
    for (const [field, patch] of over) {
      throwsModelError(() => parseModelConfig({ ...base, ...patch }, 'c.json'), 'TANDEM_MODEL_CONFIG_INVALID', field, String(MODEL_CONFIG_LIMITS[field]), 'c.json');
    }
    const rope = { rope_type: 'llama3', factor: 8, original_max_position_embeddings: 2 ** 40 };
    throwsModelError(() => parseModelConfig({ ...base, rope_scaling: rope }), 'TANDEM_MODEL_CONFIG_INVALID', 'original_max_position_embeddings', String(2 ** 24));
    throwsModelError(() => parseModelConfig({ ...base, rope_scaling: [] }), 'TANDEM_MODEL_CONFIG_INVALID', 'rope_scaling');
    // llama3 scaling smooths between the two wavelengths by dividing by their difference.
    throwsModelError(() => parseModelConfig({ ...base, rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 2, high_freq_factor: 2 } }), 'TANDEM_MODEL_CONFIG_INVALID', 'rope_scaling');
    // The limits hold real models (Llama-3.1-405B, Qwen2-72B, SmolLM-135M) and every size at its limit.
    const llama = parseModelConfig(LLAMA_405B);
    assert.deepEqual([llama.numHiddenLayers, llama.hiddenSize, llama.headDim, llama.vocabSize], [126, 16384, 128, 128256]);
    assert.deepEqual(llama.eosTokenIds, [128001, 128008, 128009]);
    const qwen = parseModelConfig(QWEN2_72B);
    assert.deepEqual([qwen.vocabSize, qwen.attentionBias, qwen.bosTokenId, qwen.eosTokenIds], [151936, true, 151643, [151643]]);
    assert.equal(llamaConfig(SMOLLM_135M_SHAPE).vocabSize, 49152);
    const { original_max_position_embeddings: ropeLimit, ...sizes } = MODEL_CONFIG_LIMITS;
    const atLimit = parseModelConfig({ ...base, ...sizes, rope_scaling: { rope_type: 'llama3', factor: 8, original_max_position_embeddings: ropeLimit } });
    assert.equal(atLimit.numHiddenLayers, 1024);
  });

  test('a folder whose config.json declares 1e9 layers is refused before any tensor work', async () => {
    const started = Date.now();
    await rejectsModelError(loadModelFolder(await storiesWith({ num_hidden_layers: 1e9 })), 'TANDEM_MODEL_CONFIG_INVALID', 'num_hidden_layers', '1024');
    await rejectsModelError(loadModelFolder(await storiesWith({ num_hidden_layers: 3000 })), 'TANDEM_MODEL_CONFIG_INVALID', 'num_hidden_layers', '1024');
    assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
  });
});

describe('config.json values are read as written, not coerced', () => {
  test('booleans must be true or false; absent takes the default', () => {
    for (const field of ['tie_word_embeddings', 'mlp_bias', 'attention_bias']) {
      for (const bad of ['false', 'true', 0, 1, [], null]) {
        throwsModelError(() => parseModelConfig({ ...base, [field]: bad }), 'TANDEM_MODEL_CONFIG_INVALID', field, JSON.stringify(bad));
      }
    }
    const absent = parseModelConfig(base);
    assert.deepEqual([absent.tieWordEmbeddings, absent.mlpBias, absent.attentionBias], [false, false, false]);
    const set = parseModelConfig({ ...base, tie_word_embeddings: true, mlp_bias: true, attention_bias: true });
    assert.deepEqual([set.tieWordEmbeddings, set.mlpBias, set.attentionBias], [true, true, true]);
  });

  test('bos and eos ids must be integers in [0, vocab_size); eos may be a list; null or absent is none', () => {
    for (const eos of ['2', [true], [2, '3'], 512, [1, 512], -1, 1.5, { id: 2 }]) {
      throwsModelError(() => parseModelConfig({ ...base, eos_token_id: eos }), 'TANDEM_MODEL_CONFIG_INVALID', 'eos_token_id', '512');
    }
    for (const bos of ['1', true, 512, -1, [1]]) {
      throwsModelError(() => parseModelConfig({ ...base, bos_token_id: bos }), 'TANDEM_MODEL_CONFIG_INVALID', 'bos_token_id', '512');
    }
    assert.deepEqual(parseModelConfig({ ...base, eos_token_id: 511, bos_token_id: 0 }).eosTokenIds, [511]);
    assert.deepEqual(parseModelConfig({ ...base, eos_token_id: [2, 3] }).eosTokenIds, [2, 3]);
    const none = parseModelConfig({ ...base, eos_token_id: null, bos_token_id: null });
    assert.deepEqual([none.eosTokenIds, none.bosTokenId], [[], undefined]);
  });

  test('a folder with tie_word_embeddings "false" is refused, not read as tied; every shipped config.json still parses', async () => {
    await rejectsModelError(loadModelFolder(await storiesWith({ tie_word_embeddings: 'false' })), 'TANDEM_MODEL_CONFIG_INVALID', 'tie_word_embeddings', '"false"');
    await rejectsModelError(loadModelFolder(await storiesWith({ eos_token_id: 99999 })), 'TANDEM_MODEL_CONFIG_INVALID', 'eos_token_id');
    const shipped = (await readdir(FIXTURES, { recursive: true })).filter((p) => p === 'config.json' || p.endsWith('/config.json'));
    assert.ok(shipped.length > 0);
    for (const p of shipped) parseModelConfig(JSON.parse(await readFile(join(FIXTURES, p), 'utf8')), p);
  });
});

/** A safetensors file from a header text. */
function withHeader(header: string, data = new Uint8Array(0)): Uint8Array {
  const h = Buffer.from(header, 'utf8');
  const out = new Uint8Array(8 + h.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.byteLength), true);
  out.set(h, 8);
  out.set(data, 8 + h.byteLength);
  return out;
}

describe('safetensors header nesting is bounded before JSON.parse', () => {
  test('arrays or objects nested past the limit are refused at once, naming the limit', () => {
    const started = Date.now();
    const n = 2_000_000;
    const deepArrays = withHeader('{"__metadata__":' + '['.repeat(n) + ']'.repeat(n) + '}');
    throwsModelError(() => parseSafetensors(deepArrays, 'deep.safetensors'), 'TANDEM_SAFETENSORS_INVALID', 'nests deeper', String(SAFETENSORS_MAX_HEADER_DEPTH), 'deep.safetensors');
    const deepObjects = withHeader('{"a":' + '{"a":'.repeat(n / 4) + '1' + '}'.repeat(n / 4) + '}');
    throwsModelError(() => parseSafetensors(deepObjects, 'deep.safetensors'), 'TANDEM_SAFETENSORS_INVALID', 'nests deeper');
    // Just past the limit, and valid JSON otherwise: refused for the depth, not by JSON.parse.
    const d = SAFETENSORS_MAX_HEADER_DEPTH;
    throwsModelError(() => parseSafetensors(withHeader('{"x":' + '['.repeat(d) + ']'.repeat(d) + '}'), 'f'), 'TANDEM_SAFETENSORS_INVALID', 'nests deeper');
    assert.ok(Date.now() - started < 2000, `took ${Date.now() - started} ms`);
  });

  test('brackets inside strings, escaped quotes included, do not count; the limit itself is accepted', async () => {
    const brackets = '[{'.repeat(50) + '\\"' + '[{'.repeat(50) + '\\\\';
    const header = JSON.stringify({ __metadata__: { note: brackets }, t: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } });
    const contents = parseSafetensors(withHeader(header, new Uint8Array(4)), 'f');
    assert.equal(contents.metadata.note, brackets);
    // The deepest nesting allowed reaches JSON.parse's own checks (an array is no metadata value).
    const d = SAFETENSORS_MAX_HEADER_DEPTH - 1;
    throwsModelError(() => parseSafetensors(withHeader('{"__metadata__":' + '['.repeat(d) + ']'.repeat(d) + '}'), 'f'), 'TANDEM_SAFETENSORS_INVALID', '__metadata__');
    // Files on disk take the same path.
    const dir = await mkdtemp(join(tmpdir(), 'tandem-header-inputs-'));
    dirs.push(dir);
    await writeFile(join(dir, 'deep.safetensors'), withHeader('{"a":' + '['.repeat(1000) + ']'.repeat(1000) + '}'));
    await rejectsModelError(readSafetensorsFile(join(dir, 'deep.safetensors')), 'TANDEM_SAFETENSORS_INVALID', 'nests deeper');
    await writeFile(join(dir, 'ok.safetensors'), serializeSafetensors({ t: { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) } }, { k: '[[[[[[[[[[' }));
    assert.deepEqual((await readSafetensorsFile(join(dir, 'ok.safetensors'))).metadata, { k: '[[[[[[[[[[' });
  });
});
