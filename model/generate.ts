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
    // NaN compares false with everything: argmax would pick id 0 again and again, and sampling
    // would draw from NaN probabilities. -Infinity masks an id; all of them masked is no choice.
    let finite = false;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v !== v || v === Infinity) throw new ModelError('TANDEM_LOGITS_NON_FINITE', `the logits of generated token ${step} hold ${v} at vocabulary id ${i}`, { field: 'logits', details: { token: step, index: i } });
      finite ||= v !== -Infinity;
    }
    if (!finite && values.length > 0) throw new ModelError('TANDEM_LOGITS_NON_FINITE', `the logits of generated token ${step} are -Infinity at every id`, { field: 'logits', details: { token: step, index: 0 } });
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

/**
 * The k largest logits, largest first, ties by the smaller id (a sort's order), in one pass over
 * the vocabulary: sorting all of it took 100-330 ms a row for a 152k vocabulary, on the serving
 * node's event loop for every request's first token.
 */
function largest(values: Float32Array, k: number): { id: number; logit: number }[] {
  const top: { id: number; logit: number }[] = [];
  if (k <= 0) return top;
  for (let id = 0; id < values.length; id++) {
    const logit = values[id];
    // An equal logit with a larger id ranks after those kept: only a larger one gets in.
    if (top.length === k && !(logit > top[k - 1].logit)) continue;
    let at = top.length;
    while (at > 0 && logit > top[at - 1].logit) at--;
    top.splice(at, 0, { id, logit });
    if (top.length > k) top.pop();
  }
  return top;
}

/**
 * Samples from softmax(values / temperature) restricted to the smallest set whose mass reaches
 * topP, in the order of a whole sort (probability descending, ties by the smaller id): the ids a
 * seed gives are those of sorting the vocabulary, but nothing is sorted beyond a few hundred ids.
 * Sorting 152k ids took 57-76 ms a token on the serving node's event loop.
 */
function sample(values: Float32Array, temperature: number, topP: number, rng: Rng): number {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const n = values.length;
  const logP = new Float64Array(n);
  const p = new Float64Array(n);
  let total = 0;
  for (let id = 0; id < n; id++) {
    // Below UNDERFLOW exp is 0 anyway; NaN (and -Infinity) logits have no mass.
    const a = (values[id] - max) / temperature;
    logP[id] = a > UNDERFLOW ? a : UNDERFLOW;
    p[id] = Math.exp(logP[id]);
    total += p[id];
  }
  if (!(total > 0)) return argmax(values);
  const mass = new OrderedMass(p, logP);
  const end = topP < 1 ? mass.crossing(topP * total, true) : undefined;
  const picked = mass.crossing(rng.next() * (end?.prefix ?? total), false);
  return end !== undefined && mass.after(picked.id, end.id) ? end.id : picked.id;
}

const UNDERFLOW = -746;

/**
 * Running sums of p in the whole sort's order without that sort: ids are split into buckets by
 * log p (each bucket wholly before the next in that order), the bucket holding the crossing is
 * split again, and only a bucket of at most SORTED ids is sorted. Every split narrows the range
 * of log p 1024-fold, so a 152k vocabulary takes one or two passes.
 */
class OrderedMass {
  static readonly SORTED = 1024;
  static readonly BUCKETS = 1024;
  readonly #p: Float64Array;
  readonly #logP: Float64Array;
  readonly #sums = new Float64Array(OrderedMass.BUCKETS);

  constructor(p: Float64Array, logP: Float64Array) {
    this.#p = p;
    this.#logP = logP;
  }

  /** Whether id a comes after id b in the order. */
  after(a: number, b: number): boolean {
    const p = this.#p;
    return p[a] < p[b] || (p[a] === p[b] && a > b);
  }

  /**
   * The first id whose running sum (it included) reaches x (inclusive) or passes it (strict),
   * with that sum; when rounding leaves the whole mass short, the last id with mass.
   */
  crossing(x: number, inclusive: boolean): { id: number; prefix: number } {
    const p = this.#p;
    const logP = this.#logP;
    const sums = this.#sums;
    const passes = (sum: number): boolean => (inclusive ? sum >= x : sum > x);
    let ids: Uint32Array | undefined; // undefined: every id
    let count = p.length;
    let before = 0;
    for (;;) {
      let lo = Infinity;
      let hi = -Infinity;
      for (let i = 0; i < count; i++) {
        const a = logP[ids === undefined ? i : ids[i]];
        if (a < lo) lo = a;
        if (a > hi) hi = a;
      }
      if (count <= OrderedMass.SORTED || lo === hi) {
        const order = ids ?? Uint32Array.from({ length: count }, (_, i) => i);
        // All equal: id order is the order already.
        if (lo !== hi) order.sort((a, b) => p[b] - p[a] || a - b);
        let last = order[0];
        for (const id of order) {
          if (p[id] === 0) break;
          before += p[id];
          last = id;
          if (passes(before)) return { id, prefix: before };
        }
        return { id: last, prefix: before };
      }
      const scale = OrderedMass.BUCKETS / (hi - lo);
      const bucketOf = (id: number): number => Math.min(OrderedMass.BUCKETS - 1, Math.floor((hi - logP[id]) * scale));
      sums.fill(0);
      for (let i = 0; i < count; i++) {
        const id = ids === undefined ? i : ids[i];
        sums[bucketOf(id)] += p[id];
      }
      let chosen = -1;
      let ahead = 0;
      let run = before;
      for (let b = 0; b < OrderedMass.BUCKETS; b++) {
        if (sums[b] === 0) continue;
        chosen = b;
        ahead = run;
        run += sums[b];
        if (passes(run)) break;
      }
      // Each split leaves out the ids of the largest and smallest log p, so it ends.
      before = ahead;
      const inside = new Uint32Array(count);
      let kept = 0;
      for (let i = 0; i < count; i++) {
        const id = ids === undefined ? i : ids[i];
        if (bucketOf(id) === chosen) inside[kept++] = id;
      }
      ids = inside.subarray(0, kept);
      count = kept;
    }
  }
}
