// Adapter serving of one node: the registry (from start), and once the model is loaded its
// tokenizer, the resident adapters and the scheduler. Routes answer TANDEM_MODEL_NOT_READY before.
import { checkTokenizerFits, loadTokenizer, ortStepper, ServingThread, tfjsStepper } from '../../model/index.ts';
import type { ServingStepper, Tokenizer } from '../../model/index.ts';
import { CloudError } from '../errors.ts';
import type { ServedModel } from '../served-model.ts';
import type { AdapterRegistry } from './adapter-registry.ts';
import { ResidentAdapters } from './resident-adapters.ts';
import { ServingScheduler } from './scheduler.ts';
import type { ServingMetrics } from './serving-metrics.ts';

export interface ServingLimits {
  /** Bytes of KV cache all requests in flight reserve together (64 MiB). */
  kvBudgetBytes: number;
  /** Requests in one batched step (32). */
  maxBatch: number;
  /**
   * Prompt tokens the newcomers of one step run together (512; on tfjs at most
   * TFJS_PREFILL_TOKENS_PER_STEP); a longer prompt runs in chunks over several steps.
   */
  prefillTokensPerStep: number;
  /** Requests waiting for a KV slot (256). */
  maxQueue: number;
  /** Of those, one tenant's (64); more are its 429, so one tenant cannot fill the queue. */
  maxQueuePerTenant: number;
  /** Adapters kept loaded (8); more are loaded on demand, the least recently used unloaded. */
  residentAdapters: number;
  /** Largest POST /v1/adapters body (64 MiB; base64 weights and config together). */
  maxUploadBytes: number;
}

/**
 * Prompt tokens a step runs on tfjs, whose steps run on the node's event loop (ORT's run on a
 * thread of their own): 471 prompt tokens of stories260K in one step held the loop 4.7 s on the
 * pure-JS cpu backend and 0.5 s on wasm; a chunk of 32 bounds a step's stall to a prefix of that.
 */
export const TFJS_PREFILL_TOKENS_PER_STEP = 32;

export const DEFAULT_SERVING_LIMITS: Readonly<ServingLimits> = {
  kvBudgetBytes: 64 * 1024 * 1024,
  maxBatch: 32,
  prefillTokensPerStep: 512,
  maxQueue: 256,
  maxQueuePerTenant: 64,
  residentAdapters: 8,
  maxUploadBytes: 64 * 1024 * 1024,
};

export interface ServingRuntime {
  served: ServedModel;
  tokenizer: Tokenizer;
  resident: ResidentAdapters;
  scheduler: ServingScheduler;
  stepper: ServingStepper;
}

export class Serving {
  readonly registry: AdapterRegistry;
  readonly limits: ServingLimits;
  readonly metrics: ServingMetrics;
  #runtime: ServingRuntime | undefined;

  constructor(registry: AdapterRegistry, metrics: ServingMetrics, limits: Partial<ServingLimits> = {}) {
    this.registry = registry;
    this.metrics = metrics;
    this.limits = { ...DEFAULT_SERVING_LIMITS, ...limits };
    for (const [name, value] of Object.entries(this.limits)) {
      if (!Number.isSafeInteger(value) || value < 1) throw new CloudError('TANDEM_OPTION_INVALID', { option: `serving.${name}`, value: String(value), reason: 'must be an integer >= 1' });
    }
  }

  /**
   * Starts serving the loaded model: batched steps on ONNX Runtime when `engine` names it
   * (the base in one graph per step, each adapter's LoRA unmerged; in a worker thread, so that
   * the node's event loop runs while a step does), on tfjs otherwise.
   */
  async start(served: ServedModel, engine?: 'ort-cpu' | 'ort-cuda'): Promise<void> {
    const tokenizer = await loadTokenizer(served.dir);
    checkTokenizerFits(tokenizer, served.config.vocabSize);
    let stepper: ServingStepper;
    if (engine !== undefined) {
      const weights = new Map([...served.model.weights].map(([name, v]) => [name, { shape: [...v.shape], data: v.dataSync() as Float32Array }]));
      stepper = ortStepper(await ServingThread.create(served.config, weights, { provider: engine === 'ort-cuda' ? 'cuda' : 'cpu' }), engine);
    } else {
      stepper = tfjsStepper(served.model);
    }
    const resident = new ResidentAdapters(served.model, (r) => this.registry.dirOf(r), this.limits.residentAdapters, (n) => this.metrics.residentAdapters.set(n));
    this.registry.onRemoved((record) => resident.drop(record));
    const scheduler = new ServingScheduler({ model: served.model, stepper, adapters: resident, metrics: this.metrics, kvBudgetBytes: this.limits.kvBudgetBytes, maxBatch: this.limits.maxBatch, prefillTokensPerStep: engine === undefined ? Math.min(this.limits.prefillTokensPerStep, TFJS_PREFILL_TOKENS_PER_STEP) : this.limits.prefillTokensPerStep, maxQueue: this.limits.maxQueue, maxQueuePerTenant: this.limits.maxQueuePerTenant });
    this.#runtime = { served, tokenizer, resident, scheduler, stepper };
  }

  runtime(): ServingRuntime {
    if (this.#runtime === undefined) throw new CloudError('TANDEM_MODEL_NOT_READY');
    return this.#runtime;
  }

  close(): void {
    const runtime = this.#runtime;
    runtime?.scheduler.close();
    runtime?.resident.dispose();
    // The engine's session goes once no step runs on it.
    if (runtime !== undefined) void runtime.scheduler.drained().then(() => runtime.stepper.dispose()).catch(() => undefined);
  }
}
