// Hugging Face model folders: config.json plus model.safetensors, or a sharded checkpoint
// (model.safetensors.index.json naming model-0000i-of-0000n.safetensors files).
import { createHash } from 'node:crypto';
import { copyFile, mkdir, rm, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { expectedTensorShapes, parseModelConfig } from './config.ts';
import type { ModelConfig } from './config.ts';
import { ModelError } from './errors.ts';
import { fromFloat32, readModelFile, readSafetensorsFile, toFloat32, writeFileAtomic, writeSafetensorsFile } from './safetensors.ts';
import type { FloatDtype, SafetensorsContents, SafetensorsTensor, SafetensorsTensorInput } from './safetensors.ts';

export const CONFIG_FILE = 'config.json';
export const SAFETENSORS_FILE = 'model.safetensors';
export const SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json';
export const TOKENIZER_FILE = 'tokenizer.json';

/** A weight as the model uses it: float32, row-major. */
export interface Weight {
  shape: number[];
  data: Float32Array;
}

export type Weights = Map<string, Weight>;

export interface LoadedModel {
  dir: string;
  config: ModelConfig;
  /** Exactly the tensors of `expectedTensorShapes(config)`, in that order. */
  weights: Weights;
  /** See `modelContentHash`. */
  contentHash: string;
  /** tokenizer.json in the folder, when there is one. */
  tokenizerPath?: string;
}

/**
 * Tensors a checkpoint may hold beyond what the configuration needs, and that we skip:
 * rotary inverse frequencies (older transformers saved them; we recompute them from the
 * config). Any other unexpected tensor is refused, because it means the checkpoint is of
 * a different architecture than config.json says (biases, another family) and loading
 * it anyway would silently compute something else.
 */
const IGNORED_TENSOR = /^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/;

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

async function fileExists(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** The largest config.json or shard index read (a 70B model's index is under 100 KB). */
const MAX_JSON_FILE_BYTES = 16 * 1024 * 1024;

async function readJsonFile(path: string, code: 'TANDEM_MODEL_CONFIG_INVALID' | 'TANDEM_SHARD_INDEX_INVALID' | 'TANDEM_TOKENIZER_INVALID'): Promise<unknown> {
  const text = Buffer.from(await readModelFile(path, MAX_JSON_FILE_BYTES)).toString('utf8');
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw new ModelError(code, `the file is not valid JSON: ${(cause as Error).message}`, { file: path, cause });
  }
}

/** Reads and parses config.json of a model folder. */
export async function readModelConfig(dir: string): Promise<ModelConfig> {
  const path = join(dir, CONFIG_FILE);
  return parseModelConfig(await readJsonFile(path, 'TANDEM_MODEL_CONFIG_INVALID'), path);
}

/** A shard name must be a plain file name in the folder: no separators, no `..`, nothing absolute. */
function isPlainFileName(name: string): boolean {
  return name.length > 0 && name !== '.' && name !== '..' && !/[/\\\0]/.test(name) && basename(name) === name;
}

/** Reads and validates model.safetensors.index.json; returns tensor name -> shard file name. */
export async function readShardIndex(dir: string): Promise<Map<string, string>> {
  const path = join(dir, SAFETENSORS_INDEX_FILE);
  const raw = await readJsonFile(path, 'TANDEM_SHARD_INDEX_INVALID');
  const bad = (message: string, tensor?: string) => new ModelError('TANDEM_SHARD_INDEX_INVALID', message, { file: path, tensor });
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw bad('the index must be a JSON object');
  const { metadata, weight_map: weightMap } = raw as Record<string, unknown>;
  if (metadata !== undefined && (typeof metadata !== 'object' || metadata === null || Array.isArray(metadata))) throw bad('metadata must be an object');
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) throw bad('weight_map must be an object mapping tensor names to shard files');
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== 'string') throw bad(`weight_map value must be a shard file name, got ${JSON.stringify(shard)}`, name);
    if (!isPlainFileName(shard)) throw bad(`shard ${JSON.stringify(shard)} must be a plain file name inside the model folder`, name);
    map.set(name, shard);
  }
  if (map.size === 0) throw bad('weight_map is empty');
  return map;
}

interface FoundTensor {
  file: string;
  entry: SafetensorsTensor;
}

/**
 * The most tensors a checkpoint of `config` may name: what it needs, a skipped rotary table per
 * layer and a tied lm_head (checkTensorSet refuses any other). A header naming more is refused
 * in its linear pass, before JSON.parse builds it: the file may have come over the network (an
 * edge's download of its part).
 */
export function maxCheckpointTensors(config: ModelConfig): number {
  return expectedTensorShapes(config).size + config.numHiddenLayers + 1;
}

/** Every tensor of the checkpoint with the file it came from; shards are checked against the index. */
async function readCheckpointTensors(dir: string, maxTensors: number): Promise<Map<string, FoundTensor>> {
  const found = new Map<string, FoundTensor>();
  const single = join(dir, SAFETENSORS_FILE);
  const indexPath = join(dir, SAFETENSORS_INDEX_FILE);
  if (await fileExists(single)) {
    const { tensors } = await readSafetensorsFile(single, { maxTensors });
    for (const [name, entry] of tensors) found.set(name, { file: single, entry });
    return found;
  }
  if (!(await fileExists(indexPath))) {
    throw new ModelError('TANDEM_MODEL_FILE_MISSING', `the folder has neither ${SAFETENSORS_FILE} nor ${SAFETENSORS_INDEX_FILE}`, { file: single });
  }
  const index = await readShardIndex(dir);
  if (index.size > maxTensors) {
    throw new ModelError('TANDEM_SHARD_INDEX_INVALID', `the index names ${index.size} tensors; a checkpoint of this config.json has at most ${maxTensors}`, { file: indexPath });
  }
  const shards = [...new Set(index.values())].sort();
  for (const shard of shards) {
    const path = join(dir, shard);
    if (!(await fileExists(path))) {
      throw new ModelError('TANDEM_MODEL_FILE_MISSING', `shard ${shard} named by ${SAFETENSORS_INDEX_FILE} does not exist`, { file: path, details: { index: indexPath } });
    }
  }
  for (const shard of shards) {
    const path = join(dir, shard);
    const contents: SafetensorsContents = await readSafetensorsFile(path, { maxTensors });
    for (const [name, entry] of contents.tensors) {
      if (index.get(name) !== shard) {
        throw new ModelError('TANDEM_SHARD_INDEX_INVALID', `the shard holds a tensor that ${SAFETENSORS_INDEX_FILE} places ${index.has(name) ? `in ${index.get(name)}` : 'nowhere'}`, {
          file: path,
          tensor: name,
        });
      }
      found.set(name, { file: path, entry });
    }
  }
  for (const [name, shard] of index) {
    if (!found.has(name)) throw new ModelError('TANDEM_TENSOR_MISSING', `${SAFETENSORS_INDEX_FILE} places the tensor in this shard but it is not there`, { file: join(dir, shard), tensor: name });
  }
  return found;
}

/**
 * The weights must be exactly what the configuration describes: every expected tensor with
 * its exact shape. With tied embeddings a stored `lm_head.weight` is allowed (of the right
 * shape) and ignored, as transformers does; see IGNORED_TENSOR for the rest.
 */
function checkTensorSet(config: ModelConfig, shapes: Map<string, { file: string; shape: readonly number[] }>, where: string): void {
  const expected = expectedTensorShapes(config);
  for (const [name, shape] of expected) {
    const got = shapes.get(name);
    if (!got) throw new ModelError('TANDEM_TENSOR_MISSING', `the checkpoint has no ${name} of shape ${JSON.stringify(shape)}`, { file: where, tensor: name });
    if (!sameShape(got.shape, shape)) {
      throw new ModelError('TANDEM_TENSOR_SHAPE_MISMATCH', `shape ${JSON.stringify(got.shape)}, the configuration needs ${JSON.stringify(shape)}`, { file: got.file, tensor: name });
    }
  }
  for (const [name, got] of shapes) {
    if (expected.has(name) || IGNORED_TENSOR.test(name)) continue;
    if (name === 'lm_head.weight' && config.tieWordEmbeddings) {
      const shape = [config.vocabSize, config.hiddenSize];
      if (!sameShape(got.shape, shape)) {
        throw new ModelError('TANDEM_TENSOR_SHAPE_MISMATCH', `shape ${JSON.stringify(got.shape)}, the configuration needs ${JSON.stringify(shape)}`, { file: got.file, tensor: name });
      }
      continue;
    }
    throw new ModelError('TANDEM_TENSOR_UNEXPECTED', `the checkpoint holds ${name}, which a ${config.modelType} model with this config.json does not have`, { file: got.file, tensor: name });
  }
}

/** The architecture fields of a configuration, with defaults resolved, that decide what the weights compute. */
function architectureOf(config: ModelConfig): Record<string, unknown> {
  return {
    model_type: config.modelType,
    hidden_size: config.hiddenSize,
    intermediate_size: config.intermediateSize,
    num_hidden_layers: config.numHiddenLayers,
    num_attention_heads: config.numAttentionHeads,
    num_key_value_heads: config.numKeyValueHeads,
    head_dim: config.headDim,
    vocab_size: config.vocabSize,
    max_position_embeddings: config.maxPositionEmbeddings,
    rms_norm_eps: config.rmsNormEps,
    rope_theta: config.ropeTheta,
    rope_scaling: config.ropeScaling
      ? Object.fromEntries(Object.entries(config.ropeScaling).filter(([, v]) => v !== undefined).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : null,
    tie_word_embeddings: config.tieWordEmbeddings,
    attention_bias: config.attentionBias,
    mlp_bias: config.mlpBias,
    hidden_act: config.hiddenAct,
  };
}

/**
 * sha256 (hex) identifying a model by what it computes, not by how it is stored:
 *   "tandem-model-v1\n" + JSON of the architecture fields (fixed key order, defaults resolved) + "\n"
 *   then for each weight in ascending name order:
 *     name + "\n" + JSON shape + "\n" + the float32 little-endian bytes
 * So one model saved as F32 or as an exact F16/BF16 upcast, unsharded or sharded,
 * hashes the same; a tied lm_head, tokenizer and non-architecture config keys do not count.
 */
export function modelContentHash(config: ModelConfig, weights: Weights): string {
  const hash = createHash('sha256');
  hash.update(`tandem-model-v1\n${JSON.stringify(architectureOf(config))}\n`);
  const names = [...weights.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  for (const name of names) {
    const w = weights.get(name) as Weight;
    hash.update(`${name}\n${JSON.stringify(w.shape)}\n`);
    hash.update(new Uint8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength));
  }
  return hash.digest('hex');
}

/**
 * Loads a Hugging Face LLaMA-family model folder: config.json, then model.safetensors or
 * the sharded index and its shards. Weights come back as float32 whatever the stored
 * float dtype (F32 weights may share memory with the file buffer).
 */
export async function loadModelFolder(dir: string): Promise<LoadedModel> {
  const config = await readModelConfig(dir);
  const found = await readCheckpointTensors(dir, maxCheckpointTensors(config));
  checkTensorSet(
    config,
    new Map([...found].map(([name, t]) => [name, { file: t.file, shape: t.entry.shape }])),
    join(dir, SAFETENSORS_FILE),
  );
  const weights: Weights = new Map();
  for (const name of expectedTensorShapes(config).keys()) {
    const { file, entry } = found.get(name) as FoundTensor;
    weights.set(name, { shape: [...entry.shape], data: toFloat32(entry, file, name) });
  }
  const tokenizerPath = join(dir, TOKENIZER_FILE);
  return {
    dir,
    config,
    weights,
    contentHash: modelContentHash(config, weights),
    tokenizerPath: (await fileExists(tokenizerPath)) ? tokenizerPath : undefined,
  };
}

export type WeightsInput = ReadonlyMap<string, Weight> | Readonly<Record<string, Weight>>;

function weightEntries(weights: WeightsInput): [string, Weight][] {
  return weights instanceof Map ? [...weights.entries()] : Object.entries(weights);
}

function encodeWeights(weights: [string, Weight][], dtype: FloatDtype): [string, SafetensorsTensorInput][] {
  return weights.map(([name, w]) => [name, { dtype, shape: w.shape, data: fromFloat32(w.data, dtype) }]);
}

export interface ShardedWriteOptions {
  /** Upper bound on the tensor bytes of one shard; a single larger tensor gets a shard of its own. */
  maxShardBytes: number;
  /** Stored as `__metadata__` in every shard. */
  metadata?: Record<string, string>;
}

/**
 * Writes tensors as a Hugging Face sharded checkpoint: model-0000i-of-0000n.safetensors,
 * filled in name order up to maxShardBytes each, and model.safetensors.index.json
 * (`{"metadata":{"total_size":N},"weight_map":{...}}`) written last, so an interrupted
 * write never leaves an index pointing at missing shards. Returns the shard file names.
 */
export async function writeShardedSafetensors(
  dir: string,
  tensors: ReadonlyMap<string, SafetensorsTensorInput> | Readonly<Record<string, SafetensorsTensorInput>>,
  options: ShardedWriteOptions,
): Promise<string[]> {
  if (!Number.isSafeInteger(options.maxShardBytes) || options.maxShardBytes <= 0) {
    throw new ModelError('TANDEM_INPUT_INVALID', `maxShardBytes must be a positive integer, got ${options.maxShardBytes}`, { field: 'maxShardBytes' });
  }
  const list = (tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors)) as [string, SafetensorsTensorInput][];
  list.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const groups: [string, SafetensorsTensorInput][][] = [];
  let size = 0;
  for (const item of list) {
    const bytes = item[1].data.byteLength;
    if (groups.length === 0 || (size + bytes > options.maxShardBytes && size > 0)) {
      groups.push([]);
      size = 0;
    }
    groups[groups.length - 1].push(item);
    size += bytes;
  }
  const pad = (i: number) => String(i).padStart(5, '0');
  const names = groups.map((_, i) => `model-${pad(i + 1)}-of-${pad(groups.length)}.safetensors`);
  const weightMap: Record<string, string> = {};
  let totalSize = 0;
  await mkdir(dir, { recursive: true });
  for (let i = 0; i < groups.length; i++) {
    await writeSafetensorsFile(join(dir, names[i]), new Map(groups[i]), options.metadata);
    for (const [name, t] of groups[i]) {
      weightMap[name] = names[i];
      totalSize += t.data.byteLength;
    }
  }
  await writeFileAtomic(join(dir, SAFETENSORS_INDEX_FILE), `${JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2)}\n`);
  return names;
}

export interface SaveModelOptions {
  /** Stored dtype of the weights; F32 by default. */
  dtype?: FloatDtype;
  /** Write a sharded checkpoint with shards of at most this many tensor bytes. */
  maxShardBytes?: number;
  /** Files copied into the folder under their own names (tokenizer.json, tokenizer_config.json...). */
  copyFiles?: string[];
}

/**
 * Writes a Hugging Face model folder that `loadModelFolder` (and transformers) can load:
 * config.json as given, the weights as model.safetensors or shards. The weights are checked
 * against the configuration first, so a folder that would not load is never written. With
 * tied embeddings `lm_head.weight` is not stored, as transformers' save_pretrained does.
 * A previous checkpoint of the other layout is removed so the folder holds one model.
 */
export async function saveModelFolder(dir: string, rawConfig: Record<string, unknown>, weights: WeightsInput, options: SaveModelOptions = {}): Promise<void> {
  const configPath = join(dir, CONFIG_FILE);
  const config = parseModelConfig(rawConfig, configPath);
  const entries = weightEntries(weights).filter(([name]) => !(name === 'lm_head.weight' && config.tieWordEmbeddings));
  checkTensorSet(config, new Map(entries.map(([name, w]) => [name, { file: '<weights>', shape: w.shape }])), '<weights>');
  for (const [name, w] of entries) {
    const n = w.shape.reduce((a, b) => a * b, 1);
    if (w.data.length !== n) throw new ModelError('TANDEM_INPUT_INVALID', `shape ${JSON.stringify(w.shape)} needs ${n} values, the data holds ${w.data.length}`, { tensor: name });
  }
  const tensors = new Map(encodeWeights(entries, options.dtype ?? 'F32'));
  await mkdir(dir, { recursive: true });
  for (const file of options.copyFiles ?? []) {
    const target = join(dir, basename(file));
    try {
      await copyFile(file, target);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      throw new ModelError(code === 'ENOENT' ? 'TANDEM_MODEL_FILE_MISSING' : 'TANDEM_MODEL_FILE_UNWRITABLE', `could not copy into ${target} (${code ?? String(cause)})`, { file, cause });
    }
  }
  await writeFileAtomic(configPath, `${JSON.stringify(rawConfig, null, 2)}\n`);
  const metadata = { format: 'pt' };
  if (options.maxShardBytes === undefined) {
    await writeSafetensorsFile(join(dir, SAFETENSORS_FILE), tensors, metadata);
    await rm(join(dir, SAFETENSORS_INDEX_FILE), { force: true });
  } else {
    // model.safetensors takes precedence when loading, so a stale one must go first.
    await rm(join(dir, SAFETENSORS_FILE), { force: true });
    await writeShardedSafetensors(dir, tensors, { maxShardBytes: options.maxShardBytes, metadata });
  }
}
