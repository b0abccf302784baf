// Adapters on disk as Hugging Face PEFT writes them: adapter_config.json and
// adapter_model.safetensors, with PEFT's field names and tensor keys.
import { mkdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { readSafetensorsFile, readSafetensorsHeader, toFloat32, writeFileAtomic, writeSafetensorsFile } from '../safetensors.ts';
import type { SafetensorsTensorInput } from '../safetensors.ts';
import type { PeftAdapter } from './compose.ts';
import { instantiate } from './compose.ts';
import type { PeftMethod } from './method.ts';
import { defaultRegistry } from './methods.ts';
import type { AdapterPlan } from './plan.ts';
import { planAdapterConfigs } from './plan.ts';
import type { MethodRegistry } from './registry.ts';

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
/** peft_type of an adapter that combines several methods (see README.md). */
export const COMPOSITE_PEFT_TYPE = 'TANDEM';
/** safetensors metadata key naming the Tandem method when the peft_type alone does not (LoRA-FA). */
export const TANDEM_METHOD_METADATA = 'tandem_method';

export interface SaveAdapterOptions {
  /** base_model_name_or_path: the Hugging Face id or folder of the base model. */
  baseModel?: string | null;
  revision?: string | null;
  /** PEFT's inference_mode; true (PEFT's value after loading for inference) unless given. */
  inferenceMode?: boolean;
  registry?: MethodRegistry;
}

export interface LoadAdapterOptions {
  registry?: MethodRegistry;
  /** Seeds the generators of the loaded adapter (dropout masks when it is trained further). */
  seed?: number;
  /**
   * Refuse (TANDEM_ADAPTER_TOO_LARGE) an adapter whose tensors would take more bytes; the
   * default is the bytes of the model's weights, at least 256 MiB (see plan.ts).
   */
  maxAllocationBytes?: number;
}

export interface PlanAdapterOptions {
  registry?: MethodRegistry;
  /** adapter_model.safetensors' metadata (it names LoRA-FA); none when absent. */
  metadata?: Readonly<Record<string, string>>;
  /** How errors name the config; ADAPTER_CONFIG_FILE unless given. */
  file?: string;
  maxAllocationBytes?: number;
}

/** A planned adapter: its validated methods and what they would allocate. */
export interface PlannedAdapter {
  methods: { method: PeftMethod; config: unknown }[];
  plan: AdapterPlan;
}

function invalid(message: string, file: string, extra: { field?: string; tensor?: string } = {}): ModelError {
  return new ModelError('TANDEM_ADAPTER_INVALID', message, { file, ...extra });
}

/** Writes the adapter folder; the weights first, so a folder with a config is complete. */
export async function saveAdapter(adapter: PeftAdapter, dir: string, options: SaveAdapterOptions = {}): Promise<void> {
  const registry = options.registry ?? defaultRegistry();
  const common = {
    base_model_name_or_path: options.baseModel ?? null,
    revision: options.revision ?? null,
    inference_mode: options.inferenceMode ?? true,
    task_type: 'CAUSAL_LM',
  };
  const metadata: Record<string, string> = { format: 'pt' };
  let config: Record<string, unknown>;
  if (adapter.methods.length === 1) {
    const { method, config: c } = adapter.methods[0];
    config = { ...method.toJson(c), ...common };
    if (registry.forPeftType(method.peftType) !== method) metadata[TANDEM_METHOD_METADATA] = method.name;
  } else {
    config = { peft_type: COMPOSITE_PEFT_TYPE, ...common, methods: adapter.methods.map((m) => ({ tandem_method: m.method.name, ...m.method.toJson(m.config) })) };
  }
  const tensors = new Map<string, SafetensorsTensorInput>();
  for (const [key, s] of adapter.state()) tensors.set(key, { dtype: 'F32', shape: s.variable.shape, data: s.variable.dataSync() as Float32Array });
  await mkdir(dir, { recursive: true });
  await writeSafetensorsFile(join(dir, ADAPTER_WEIGHTS_FILE), tensors, metadata);
  await writeFileAtomic(join(dir, ADAPTER_CONFIG_FILE), `${JSON.stringify(config, null, 2)}\n`);
}

/** adapter_config.json is a few hundred bytes; a larger one is refused before it is read. */
export const ADAPTER_CONFIG_MAX_BYTES = 1 << 20;

/**
 * Tensors an adapter's weights file may name. LoRA with DoRA on every linear module of a
 * 126-layer model holds 2,646; a header costs ~8 µs a tensor to parse and check (300,000 in a
 * 38 MB upload took 2.3 s of the node's thread), so a file naming more is refused in the
 * linear pass before its header is parsed.
 */
export const MAX_ADAPTER_TENSORS = 16_384;

/**
 * adapter_config.json of an adapter folder, read and checked: TANDEM_MODEL_FILE_MISSING,
 * TANDEM_MODEL_FILE_UNREADABLE, TANDEM_ADAPTER_INVALID (not a file, over ADAPTER_CONFIG_MAX_BYTES,
 * not JSON, not an object). loadAdapter and the edge's upload read it through this.
 */
export async function readAdapterConfig(dir: string): Promise<Record<string, unknown>> {
  return readConfig(join(dir, ADAPTER_CONFIG_FILE));
}

async function readConfig(file: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    const s = await stat(file);
    if (!s.isFile()) throw invalid('adapter_config.json is not a file', file);
    if (s.size > ADAPTER_CONFIG_MAX_BYTES) throw new ModelError('TANDEM_ADAPTER_INVALID', `adapter_config.json is ${s.size} bytes, over the limit of ${ADAPTER_CONFIG_MAX_BYTES}`, { file, details: { bytes: s.size, limit: ADAPTER_CONFIG_MAX_BYTES } });
    text = await readFile(file, 'utf8');
  } catch (cause) {
    if (cause instanceof ModelError) throw cause;
    const code = (cause as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ModelError('TANDEM_MODEL_FILE_MISSING', 'the adapter folder has no adapter_config.json', { file, cause });
    throw new ModelError('TANDEM_MODEL_FILE_UNREADABLE', `the file could not be read (${code ?? String(cause)})`, { file, cause });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw invalid(`not valid JSON: ${(cause as Error).message}`, file);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw invalid('must hold a JSON object', file);
  return json as Record<string, unknown>;
}

/** Reads which methods a config describes, each validated by its own method. */
function methodsOf(json: Record<string, unknown>, file: string, metadata: Readonly<Record<string, string>>, registry: MethodRegistry): { method: PeftMethod; config: unknown }[] {
  const taskType = json.task_type;
  if (taskType !== undefined && taskType !== null && taskType !== 'CAUSAL_LM') {
    throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `task_type ${JSON.stringify(taskType)} is not supported; Tandem trains causal language models (CAUSAL_LM)`, { file, field: 'task_type' });
  }
  const peftType = json.peft_type;
  if (typeof peftType !== 'string') throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', 'peft_type must be a string such as "LORA"', { file, field: 'peft_type' });
  if (peftType !== COMPOSITE_PEFT_TYPE) {
    const named = Object.hasOwn(metadata, TANDEM_METHOD_METADATA) ? metadata[TANDEM_METHOD_METADATA] : undefined;
    const method = named !== undefined ? registry.get(named) : registry.forPeftType(peftType, file);
    if (method.peftType !== peftType) throw invalid(`the weights say method ${method.name} (peft_type ${method.peftType}) but the config says ${peftType}`, file, { field: 'peft_type' });
    return [{ method, config: method.fromJson(json, file) }];
  }
  const list = json.methods;
  if (!Array.isArray(list) || list.length === 0) throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', 'a TANDEM adapter needs a non-empty methods list', { file, field: 'methods' });
  return list.map((entry: unknown, i) => {
    if (typeof entry !== 'object' || entry === null || typeof (entry as Record<string, unknown>).tandem_method !== 'string') {
      throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', 'each entry of methods needs a tandem_method name', { file, field: `methods[${i}].tandem_method` });
    }
    const e = entry as Record<string, unknown>;
    const method = registry.get(e.tandem_method as string);
    if (e.peft_type !== method.peftType) {
      throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `peft_type must be ${method.peftType} for ${method.name}, got ${JSON.stringify(e.peft_type)}`, { file, field: `methods[${i}].peft_type` });
    }
    return { method, config: method.fromJson(e, file) };
  });
}

/**
 * Plans an adapter_config.json (parsed) on a model without allocating anything: every field is
 * validated by its method, every size it states is checked against the model, and the bytes its
 * tensors would take against the limit (see planAdapterConfigs). What the cloud node checks an
 * uploaded adapter with before keeping it, and what loadAdapter does first.
 */
export function planAdapter(model: LlamaModel, json: unknown, options: PlanAdapterOptions = {}): PlannedAdapter {
  const file = options.file ?? ADAPTER_CONFIG_FILE;
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw invalid('must hold a JSON object', file);
  const methods = methodsOf(json as Record<string, unknown>, file, options.metadata ?? {}, options.registry ?? defaultRegistry());
  return { methods, plan: planAdapterConfigs(model, methods, { file, maxAllocationBytes: options.maxAllocationBytes }) };
}

/**
 * Compares a safetensors header (its tensors' names and shapes, no data needed) with a plan:
 * a tensor the plan declares must be there with its shape (TANDEM_TENSOR_MISSING,
 * TANDEM_TENSOR_SHAPE_MISMATCH) and a tensor it does not declare is TANDEM_ADAPTER_INVALID.
 */
export function checkAdapterWeights(plan: AdapterPlan, tensors: ReadonlyMap<string, { readonly shape: readonly number[] }>, file: string): void {
  for (const [key, want] of plan.tensors) {
    const entry = tensors.get(key);
    if (!entry) throw new ModelError('TANDEM_TENSOR_MISSING', `the configuration declares this tensor but ${ADAPTER_WEIGHTS_FILE} lacks it`, { file, tensor: key });
    if (entry.shape.length !== want.length || entry.shape.some((d, i) => d !== want[i])) {
      throw new ModelError('TANDEM_TENSOR_SHAPE_MISMATCH', `expected [${want}] for this model and configuration, got [${entry.shape}]`, { file, tensor: key });
    }
  }
  for (const key of tensors.keys()) {
    if (!plan.tensors.has(key)) throw invalid('holds a tensor the configuration does not declare (a different target_modules, layers or rank?)', file, { tensor: key });
  }
}

/**
 * Loads an adapter folder onto a model: the configuration is validated field by field, its
 * sizes against the model and the bytes it would allocate against the limit, and every tensor
 * it declares must be in the weights file's header with its shape (a tensor it does not declare
 * is an error too), all before any adapter tensor is allocated and before the weights' data is
 * read. Errors name the file and the tensor.
 */
export async function loadAdapter(model: LlamaModel, dir: string, options: LoadAdapterOptions = {}): Promise<PeftAdapter> {
  const registry = options.registry ?? defaultRegistry();
  const configFile = join(dir, ADAPTER_CONFIG_FILE);
  const weightsFile = join(dir, ADAPTER_WEIGHTS_FILE);
  const json = await readConfig(configFile);
  // The header alone settles whether the file fits the plan: a mismatch costs no read of the data.
  const header = await readSafetensorsHeader(weightsFile, { maxTensors: MAX_ADAPTER_TENSORS });
  const { methods: configs, plan } = planAdapter(model, json, { registry, metadata: header.metadata, file: configFile, maxAllocationBytes: options.maxAllocationBytes });
  checkAdapterWeights(plan, header.tensors, weightsFile);
  const weights = await readSafetensorsFile(weightsFile, { maxTensors: MAX_ADAPTER_TENSORS });
  const adapter = instantiate(model, configs, { seed: options.seed ?? 0, fromFile: true, plan });
  try {
    const state = adapter.state();
    for (const [key, s] of state) {
      const entry = weights.tensors.get(key);
      if (!entry) throw new ModelError('TANDEM_TENSOR_MISSING', `the configuration declares this tensor but ${ADAPTER_WEIGHTS_FILE} lacks it`, { file: weightsFile, tensor: key });
      const want = s.variable.shape;
      if (entry.shape.length !== want.length || entry.shape.some((d, i) => d !== want[i])) {
        throw new ModelError('TANDEM_TENSOR_SHAPE_MISMATCH', `expected [${want}] for this model and configuration, got [${entry.shape}]`, { file: weightsFile, tensor: key });
      }
      const values = toFloat32(entry, weightsFile, key);
      tf.tidy(() => s.variable.assign(tf.tensor(values, want, 'float32')));
    }
    for (const key of weights.tensors.keys()) {
      if (!state.has(key)) throw invalid('holds a tensor the configuration does not declare (a different target_modules, layers or rank?)', weightsFile, { tensor: key });
    }
  } catch (err) {
    adapter.dispose();
    throw err;
  }
  return adapter;
}
