import { tf } from './backend.ts';
import type { ModelConfig } from './config.ts';
import { OrtKvCache } from './engine/ort-llama.ts';
import type { OrtLlama } from './engine/ort-llama.ts';
import { ModelError } from './errors.ts';
import type { ForwardHooks } from './hooks.ts';
import { KvCache, type LlamaModel } from './llama/llama.ts';
import { Rng } from './random.ts';

export interface GenerateOptions {
  maxNewTokens: number;
  /** 0 means greedy (argmax). */
  temperature?: number;
  topP?: number;
  seed?: number;
  /** Tokens that end the text; defaults to the model's eos ids plus its bos id. */
  stopTokenIds?: number[];
  hooks?: ForwardHooks;
  /** How many of the largest logits at the last prompt position to report. */
  topLogits?: number;
}

export interface GenerateResult {
  generatedIds: number[];
  /** The largest logits at the last prompt position (they predict the first new token). */
  topLogits: { id: number; logit: number }[];
  stoppedBy: 'length' | 'stop-token';
}

/**
 * Generates with a KV cache. Stops on eos and, by default, on bos: models trained on
 * documents separated by bos alone (stories260K) end a text by starting the next one.
 */
export function generate(model: LlamaModel, inputIds: number[], options: GenerateOptions): GenerateResult {
  const loop = new GenerationLoop(model.config, inputIds, options);
  const cache = new KvCache();
  try {
    let next: number[] | undefined = loop.first();
    while (next !== undefined) {
      const run: number[] = next;
      const last = tf.tidy(() => {
        const ids = tf.tensor2d(run, [1, run.length], 'int32');
        const logits = model.forward(ids, { cache, hooks: options.hooks });
        return tf.reshape(tf.slice(logits, [0, logits.shape[1] - 1, 0], [1, 1, logits.shape[2]]), [logits.shape[2]]);
      });
      const values = last.dataSync() as Float32Array;
      last.dispose();
      next = loop.take(values);
    }
  } finally {
    cache.dispose();
  }
  return loop.result();
}

/**
 * generate() with the frozen model on ONNX Runtime (its KV cache), choosing tokens exactly as
 * generate() does (greedy, or the same seeded nucleus sampling). Hooks cannot run there: an
 * adapter must be merged into the engine's weights first.
 */
export async function generateOrt(engine: OrtLlama, inputIds: number[], options: Omit<GenerateOptions, 'hooks'>): Promise<GenerateResult> {
  if ((options as GenerateOptions).hooks !== undefined) throw new ModelError('TANDEM_INPUT_INVALID', 'hooks cannot run on the ONNX Runtime engine; merge the adapter into the weights', { field: 'hooks' });
  const loop = new GenerationLoop(engine.config, inputIds, options);
  const cache = new OrtKvCache();
  let next: number[] | undefined = loop.first();
  while (next !== undefined) {
    next = loop.take(await engine.logitsCached(Int32Array.from(next), 1, next.length, cache));
  }
  return loop.result();
}

/** Checks the options, then picks each token from the last position's logits. */
export class GenerationLoop {
  readonly #options: Omit<GenerateOptions, 'hooks'>;
  readonly #stop: Set<number>;
  readonly #rng: Rng;
  readonly #temperature: number;
  readonly #topP: number;
  readonly #inputIds: number[];
  readonly #generatedIds: number[] = [];
  #topLogits: GenerateResult['topLogits'] = [];
  #stoppedBy: GenerateResult['stoppedBy'] = 'length';

  constructor(config: ModelConfig, inputIds: number[], options: Omit<GenerateOptions, 'hooks'>) {
    const { maxNewTokens } = options;
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) throw new ModelError('TANDEM_INPUT_INVALID', `max new tokens must be a non-negative integer, got ${maxNewTokens}`, { field: 'max_new_tokens' });
    if (inputIds.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'the prompt has no tokens', { field: 'input_ids' });
    const temperature = options.temperature ?? 1;
    const topP = options.topP ?? 1;
    if (!(temperature >= 0)) throw new ModelError('TANDEM_INPUT_INVALID', `temperature must be >= 0, got ${temperature}`, { field: 'temperature' });
    if (!(topP > 0 && topP <= 1)) throw new ModelError('TANDEM_INPUT_INVALID', `top-p must be in (0, 1], got ${topP}`, { field: 'top_p' });
    const limit = config.maxPositionEmbeddings;
    if (inputIds.length + maxNewTokens > limit) {
      throw new ModelError('TANDEM_INPUT_INVALID', `prompt (${inputIds.length}) plus new tokens (${maxNewTokens}) exceed max_position_embeddings ${limit}`, { field: 'max_new_tokens' });
    }
    this.#options = options;
    this.#inputIds = inputIds;
    this.#temperature = temperature;
    this.#topP = topP;
    this.#stop = new Set(options.stopTokenIds ?? [...config.eosTokenIds, ...(config.bosTokenId === undefined ? [] : [config.bosTokenId])]);
    this.#rng = new Rng(options.seed ?? 0);
  }

  /** The ids to run first (the prompt). */
  first(): number[] {
    return this.#inputIds;
  }

  /** The last position's logits → the ids to run next, or undefined when done. */
  take(values: Float32Array): number[] | undefined {
    const step = this.#generatedIds.length;
    if (step === 0) this.#topLogits = largest(values, this.#options.topLogits ?? 10);
    if (this.#options.maxNewTokens === 0) return undefined;
    const id = this.#temperature === 0 ? argmax(values) : sample(values, this.#temperature, this.#topP, this.#rng);
    this.#generatedIds.push(id);
    if (this.#stop.has(id)) {
      this.#stoppedBy = 'stop-token';
      return undefined;
    }
    return this.#generatedIds.length < this.#options.maxNewTokens ? [id] : undefined;
  }

  result(): GenerateResult {
    return { generatedIds: this.#generatedIds, topLogits: this.#topLogits, stoppedBy: this.#stoppedBy };
  }
}

function argmax(values: Float32Array): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function largest(values: Float32Array, k: number): { id: number; logit: number }[] {
  return Array.from(values, (logit, id) => ({ id, logit }))
    .sort((a, b) => b.logit - a.logit || a.id - b.id)
    .slice(0, k);
}

/** Samples from softmax(values / temperature) restricted to the smallest set whose mass reaches topP. */
function sample(values: Float32Array, temperature: number, topP: number, rng: Rng): number {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const order = Array.from(values, (v, id) => ({ id, p: Math.exp((v - max) / temperature) }));
  let total = 0;
  for (const o of order) total += o.p;
  order.sort((a, b) => b.p - a.p || a.id - b.id);
  let kept = 0;
  let mass = 0;
  while (kept < order.length && (kept === 0 || mass < topP * total)) mass += order[kept++].p;
  let r = rng.next() * mass;
  for (let i = 0; i < kept; i++) {
    r -= order[i].p;
    if (r < 0) return order[i].id;
  }
  return order[kept - 1].id;
}
