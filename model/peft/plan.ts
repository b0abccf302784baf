// What an adapter would allocate, known before anything is: each method declares the tensors it
// would create from its configuration and the model's weight shapes (checking the sizes the
// configuration states against the model), and their bytes are summed and held to a limit.
// createAdapter and loadAdapter plan first; the cloud node plans an upload before writing it.
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { DeclaredTensor, PeftMethod } from './method.ts';

/** The least allocation limit of the default: a tiny model's adapters may outweigh the model itself. */
export const MIN_ADAPTER_ALLOCATION_LIMIT_BYTES = 256 * 1024 * 1024;
const FLOAT32_BYTES = 4;

export interface AdapterPlan {
  /** Every tensor the adapter will hold (or copy), by on-disk key, in creation order. */
  readonly tensors: ReadonlyMap<string, readonly number[]>;
  /** Bytes of those tensors in float32: what creating or loading the adapter allocates, transient copies aside. */
  readonly bytes: number;
  /** The limit `bytes` was held to. */
  readonly limit: number;
}

export interface PlanOptions {
  /** The adapter_config.json the configurations came from, named in errors (fields then go by PEFT's names). */
  file?: string;
  /** Refuse an adapter whose tensors take more bytes; defaultAdapterAllocationLimit(model) unless given. */
  maxAllocationBytes?: number;
}

/** Bytes of the model's weights as this model (or model part) holds them, in float32. */
export function modelWeightBytes(model: LlamaModel): number {
  let n = 0;
  for (const w of model.weights.values()) n += w.size;
  return n * FLOAT32_BYTES;
}

/**
 * The default limit: the bytes of the base weights held, or MIN_ADAPTER_ALLOCATION_LIMIT_BYTES
 * if more. Loading an adapter at most doubles what the model holds; every adapter PEFT writes is
 * a fraction of its model (LoRA r = 256 on every linear module of Llama-2-7B is 2.5 GB next to
 * 27 GB), and whole-block training copies at most the blocks held.
 */
export function defaultAdapterAllocationLimit(model: LlamaModel): number {
  return Math.max(MIN_ADAPTER_ALLOCATION_LIMIT_BYTES, modelWeightBytes(model));
}

function elements(shape: readonly number[]): number {
  return shape.reduce((n, d) => n * d, 1);
}

/**
 * Declares every method's tensors on the model and sums their bytes, allocating nothing. Throws
 * TANDEM_PEFT_CONFIG_INVALID for a size over what the model allows (naming the field and the
 * limit) or a key two methods both declare, and TANDEM_ADAPTER_TOO_LARGE when the tensors
 * together take more than the limit.
 */
export function planAdapterConfigs(model: LlamaModel, configs: readonly { method: PeftMethod; config: unknown }[], options: PlanOptions = {}): AdapterPlan {
  const limit = options.maxAllocationBytes ?? defaultAdapterAllocationLimit(model);
  if (typeof limit !== 'number' || !(limit > 0)) throw new ModelError('TANDEM_INPUT_INVALID', `maxAllocationBytes must be a positive number, got ${String(limit)}`, { field: 'maxAllocationBytes' });
  const tensors = new Map<string, readonly number[]>();
  const owners = new Map<string, string>();
  let bytes = 0;
  for (const { method, config } of configs) {
    const declared: DeclaredTensor[] = method.declare(model, config, { file: options.file });
    for (const { key, shape } of declared) {
      const other = owners.get(key);
      if (other !== undefined) throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `${method.name} and ${other} both save ${key}; one method of each kind per module`, { file: options.file, field: 'specs', tensor: key });
      owners.set(key, method.name);
      tensors.set(key, [...shape]);
      bytes += elements(shape) * FLOAT32_BYTES;
    }
  }
  if (bytes > limit) {
    const mib = (n: number): string => `${(n / 2 ** 20).toFixed(1)} MiB`;
    throw new ModelError('TANDEM_ADAPTER_TOO_LARGE', `the adapter's tensors would take ${bytes} bytes (${mib(bytes)}), over the limit of ${limit} bytes (${mib(limit)}); choose a smaller rank, size or fewer modules`, {
      file: options.file,
      details: { actual: bytes, limit },
    });
  }
  return { tensors, bytes, limit };
}
