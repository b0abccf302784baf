// Batched serving steps on ONNX Runtime (serving-graph.ts): each sequence holds its own KV
// cache in plain arrays sized once (prompt plus max_tokens positions); a step packs the caches
// of its rows into [B, kvHeads, P, headDim] with a mask over the padding, runs the graph once,
// and writes the new keys and values back. Rows that add one token (decode) and rows that add
// several (prefill) run as separate graph runs, so a newcomer's prompt never pads the others.
import { availableParallelism } from 'node:os';
import type * as Ort from 'onnxruntime-node';
import type { ModelConfig } from '../config.ts';
import { ModelError } from '../errors.ts';
import { LINEAR_MODULES } from '../hooks.ts';
import { ropeInverseFrequencies, ropeTables } from '../llama/rope.ts';
import type { LoraSpec, WeightArrays } from './llama-graphs.ts';
import { loraPaths, modulePath } from './llama-graphs.ts';
import { encodeModel } from './onnx-proto.ts';
import type { LoraParams, OrtProvider } from './ort-llama.ts';
import { loadOrt } from './ort-llama.ts';
import { servingLoraNames, servingNewName, servingPastName, servingSelName, servingStepGraph } from './serving-graph.ts';

const MASKED = -1e9;
/** Stacked LoRA feeds kept, by the batch's adapter list. */
const LORA_FEEDS_KEPT = 8;
/** Positions a kept decode layout leaves free for the steps to come. */
const LAYOUT_SLACK = 32;

/** What one more graph run costs, in padded token positions (a pass over the weights). */
const RUN_COST_TOKENS = 16;

/**
 * Rows adding several tokens, split into runs of similar lengths so that padding to the
 * longest of a run wastes little: the split of the rows sorted by length that minimises
 * Σ runs (RUN_COST_TOKENS + rows · longest) (a dynamic program over the sorted rows).
 */
export function prefillGroups<T extends { r: { ids: readonly number[] } }>(rows: readonly T[]): T[][] {
  if (rows.length <= 1) return rows.length === 0 ? [] : [[...rows]];
  const sorted = [...rows].sort((a, b) => a.r.ids.length - b.r.ids.length);
  const n = sorted.length;
  const best = new Float64Array(n + 1).fill(Infinity);
  const cut = new Int32Array(n + 1);
  best[0] = 0;
  for (let end = 1; end <= n; end++) {
    const longest = sorted[end - 1].r.ids.length;
    for (let start = 0; start < end; start++) {
      const cost = best[start] + RUN_COST_TOKENS + (end - start) * longest;
      if (cost < best[end]) {
        best[end] = cost;
        cut[end] = start;
      }
    }
  }
  const groups: T[][] = [];
  for (let end = n; end > 0; end = cut[end]) groups.unshift(sorted.slice(cut[end], end));
  return groups;
}

/** One adapter's plain LoRA as the serving graph takes it. */
export class ServingLora {
  readonly spec: LoraSpec;
  /** By module path: A [r, in] and scaling · B [out, r]. */
  readonly factors: ReadonlyMap<string, { a: Float32Array; b: Float32Array }>;

  constructor(config: ModelConfig, spec: LoraSpec, params: LoraParams) {
    this.spec = spec;
    const factors = new Map<string, { a: Float32Array; b: Float32Array }>();
    for (const path of loraPaths(config, spec)) {
      const p = params.get(path);
      if (!p) throw new ModelError('TANDEM_INPUT_INVALID', `LoRA parameters for ${path} are missing`, { field: 'params' });
      factors.set(path, { a: p.a, b: p.b.map((x) => x * spec.scaling) });
    }
    this.factors = factors;
  }
}

/** One sequence's state: its KV cache, positions used, and its adapter (none: the base). */
let sequenceIds = 0;

export class ServingSequence {
  readonly id = ++sequenceIds;
  /** Positions held. */
  length = 0;
  /** Per layer, [kvHeads, capacity, headDim]. */
  readonly k: Float32Array[];
  readonly v: Float32Array[];

  constructor(
    config: ModelConfig,
    readonly capacity: number,
    readonly lora: ServingLora | undefined,
  ) {
    const size = config.numKeyValueHeads * capacity * config.headDim;
    this.k = Array.from({ length: config.numHiddenLayers }, () => new Float32Array(size));
    this.v = Array.from({ length: config.numHiddenLayers }, () => new Float32Array(size));
  }

  get bytes(): number {
    return 2 * this.k.length * (this.k[0]?.byteLength ?? 0);
  }
}

export interface ServingRow {
  ids: readonly number[];
  sequence: ServingSequence;
}

interface LoraFeeds {
  key: string;
  feeds: Record<string, Ort.Tensor>;
  /** Per module name, the first rank column of each adapter (by its index in the batch's list), and K. */
  columns: Map<string, { starts: Map<ServingLora, number>; k: number }>;
}

/** Milliseconds spent so far: packing the feeds (caches, masks, LoRA stacks), in the graph, writing caches back. */
export interface ServingTimings {
  runs: number;
  packMs: number;
  graphMs: number;
  unpackMs: number;
}

export class OrtServingEngine {
  readonly config: ModelConfig;
  readonly timings: ServingTimings = { runs: 0, packMs: 0, graphMs: 0, unpackMs: 0 };
  readonly #ort: typeof Ort;
  readonly #session: Ort.InferenceSession;
  readonly #invFreq: Float64Array;
  /** Stacked factors by the batch's adapter list, the most recently used last (a step's prefill and decode runs differ). */
  readonly #loraCache = new Map<string, LoraFeeds>();
  /**
   * The decode rows' caches packed as the graph takes them ([B, kvHeads, P, headDim] per layer),
   * kept from step to step while the rows are the same: a step then only writes its new
   * positions, instead of packing every cache again (which grows with the context).
   */
  #layout: { key: string; P: number; k: Float32Array[]; v: Float32Array[] } | undefined;
  /** Reused feed buffers by name (a run's inputs are read before run() returns). */
  readonly #buffers = new Map<string, Float32Array>();
  readonly #ids = new WeakMap<ServingLora, number>();
  #nextId = 1;

  private constructor(ort: typeof Ort, config: ModelConfig, session: Ort.InferenceSession) {
    this.#ort = ort;
    this.config = config;
    this.#session = session;
    this.#invFreq = ropeInverseFrequencies(config);
  }

  static async create(config: ModelConfig, weights: WeightArrays, options: { threads?: number; provider?: OrtProvider } = {}): Promise<OrtServingEngine> {
    const ort = await loadOrt();
    const session = await ort.InferenceSession.create(encodeModel(servingStepGraph(config, weights)), {
      executionProviders: [options.provider ?? 'cpu'],
      intraOpNumThreads: options.threads ?? availableParallelism(),
      interOpNumThreads: 1,
      executionMode: 'sequential',
      graphOptimizationLevel: 'all',
    });
    return new OrtServingEngine(ort, config, session);
  }

  /** A sequence with room for `capacity` positions, with this adapter's LoRA (none: the base). */
  sequence(capacity: number, lora?: ServingLora): ServingSequence {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > this.config.maxPositionEmbeddings) {
      throw new ModelError('TANDEM_INPUT_INVALID', `capacity must be an integer in [1, ${this.config.maxPositionEmbeddings}], got ${capacity}`, { field: 'capacity' });
    }
    return new ServingSequence(this.config, capacity, lora);
  }

  /** Runs every row's new tokens, appending to its cache; returns each row's logits at its last new token. */
  async step(rows: readonly ServingRow[]): Promise<Float32Array[]> {
    for (const row of rows) {
      if (row.ids.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'a row of a batched step has no tokens', { field: 'input_ids' });
      if (row.sequence.length + row.ids.length > row.sequence.capacity) {
        throw new ModelError('TANDEM_INPUT_INVALID', `a row reaches position ${row.sequence.length + row.ids.length}, over its capacity ${row.sequence.capacity}`, { field: 'input_ids' });
      }
      for (const id of row.ids) {
        if (!(Number.isInteger(id) && id >= 0 && id < this.config.vocabSize)) throw new ModelError('TANDEM_INPUT_INVALID', `token id ${id} is outside [0, ${this.config.vocabSize})`, { field: 'input_ids' });
      }
    }
    const out = new Array<Float32Array>(rows.length);
    const decode = rows.map((r, i) => ({ r, i })).filter((x) => x.r.ids.length === 1);
    const prefill = rows.map((r, i) => ({ r, i })).filter((x) => x.r.ids.length > 1);
    for (const group of [...prefillGroups(prefill), decode]) {
      if (group.length === 0) continue;
      const logits = await this.#run(group.map((x) => x.r));
      group.forEach((x, j) => { out[x.i] = logits[j]; });
    }
    return out;
  }

  #idOf(lora: ServingLora): number {
    let id = this.#ids.get(lora);
    if (id === undefined) {
      id = this.#nextId++;
      this.#ids.set(lora, id);
    }
    return id;
  }

  /** The stacked factors of the batch's adapters (in first-appearance order), kept while the list is the same. */
  #loraFeeds(loras: readonly ServingLora[]): LoraFeeds {
    const key = loras.map((l) => this.#idOf(l)).join(',');
    const cached = this.#loraCache.get(key);
    if (cached !== undefined) {
      this.#loraCache.delete(key);
      this.#loraCache.set(key, cached);
      return cached;
    }
    const feeds: Record<string, Ort.Tensor> = {};
    const columns: LoraFeeds['columns'] = new Map();
    for (const name of LINEAR_MODULES) {
      const starts = new Map<ServingLora, number>();
      let k = 0;
      for (const l of loras) {
        if (!l.spec.modules.includes(name)) continue;
        starts.set(l, k);
        k += l.spec.r;
      }
      const width = Math.max(1, k);
      columns.set(name, { starts, k: width });
      for (let layer = 0; layer < this.config.numHiddenLayers; layer++) {
        const path = modulePath(layer, name);
        const [out, inF] = this.#shapeOf(name);
        const a = new Float32Array(width * inF);
        const b = new Float32Array(out * width);
        for (const [l, start] of starts) {
          const f = l.factors.get(path);
          if (!f) continue;
          const r = l.spec.r;
          a.set(f.a, start * inF);
          for (let o = 0; o < out; o++) b.set(f.b.subarray(o * r, (o + 1) * r), o * width + start);
        }
        const names = servingLoraNames(path);
        feeds[names.a] = new this.#ort.Tensor('float32', a, [width, inF]);
        feeds[names.b] = new this.#ort.Tensor('float32', b, [out, width]);
      }
    }
    const made = { key, feeds, columns };
    this.#loraCache.set(key, made);
    for (const old of this.#loraCache.keys()) {
      if (this.#loraCache.size <= LORA_FEEDS_KEPT) break;
      this.#loraCache.delete(old);
    }
    return made;
  }

  #shapeOf(name: (typeof LINEAR_MODULES)[number]): [number, number] {
    const { hiddenSize: d, intermediateSize: f, numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd } = this.config;
    switch (name) {
      case 'q_proj': return [nH * hd, d];
      case 'k_proj': case 'v_proj': return [nKv * hd, d];
      case 'o_proj': return [d, nH * hd];
      case 'gate_proj': case 'up_proj': return [f, d];
      case 'down_proj': return [d, f];
    }
  }

  /** The kept layout of these decode rows, packed again when the rows changed or one outgrew it. */
  #decodeLayout(rows: readonly ServingRow[], longest: number): { P: number; k: Float32Array[]; v: Float32Array[] } {
    const key = rows.map((r) => r.sequence.id).join(',');
    const kept = this.#layout;
    if (kept !== undefined && kept.key === key && rows.every((r) => r.sequence.length <= kept.P)) return kept;
    const { numKeyValueHeads: nKv, headDim: hd, numHiddenLayers: L } = this.config;
    // Room for LAYOUT_SLACK more positions (within the rows' capacity) before packing again.
    const P = Math.max(longest, Math.min(Math.max(...rows.map((r) => r.sequence.capacity)) - 1, longest + LAYOUT_SLACK));
    const B = rows.length;
    const pack = (kv: 'k' | 'v', layer: number): Float32Array => {
      const packed = new Float32Array(B * nKv * P * hd);
      rows.forEach((row, b) => {
        const s = row.sequence;
        for (let h = 0; h < nKv; h++) packed.set(s[kv][layer].subarray(h * s.capacity * hd, (h * s.capacity + s.length) * hd), (b * nKv + h) * P * hd);
      });
      return packed;
    };
    this.#layout = { key, P, k: Array.from({ length: L }, (_, i) => pack('k', i)), v: Array.from({ length: L }, (_, i) => pack('v', i)) };
    return this.#layout;
  }

  /** A view of `size` floats of a buffer kept for this feed; the caller overwrites every value. */
  #buffer(name: string, size: number): Float32Array {
    let b = this.#buffers.get(name);
    if (b === undefined || b.length < size) {
      b = new Float32Array(Math.max(size, Math.ceil((b?.length ?? 0) * 1.5)));
      this.#buffers.set(name, b);
    }
    return b.subarray(0, size);
  }

  async #run(rows: readonly ServingRow[]): Promise<Float32Array[]> {
    const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd, numHiddenLayers: L, vocabSize } = this.config;
    const grp = nH / nKv;
    const t0 = performance.now();
    const B = rows.length;
    const S = Math.max(...rows.map((r) => r.ids.length));
    const longest = Math.max(...rows.map((r) => r.sequence.length));
    const layout = S === 1 ? this.#decodeLayout(rows, longest) : undefined;
    const P = layout?.P ?? longest;
    const T = P + S;
    const ids = new Int32Array(B * S);
    const cos = new Float32Array(B * S * hd);
    const sin = new Float32Array(B * S * hd);
    const mask = new Float32Array(B * grp * S * T).fill(MASKED);
    const lastRows = new BigInt64Array(B);
    rows.forEach((row, b) => {
      const n = row.ids.length;
      const past = row.sequence.length;
      ids.set(row.ids, b * S);
      const t = ropeTables(this.#invFreq, past, S);
      cos.set(t.cos, b * S * hd);
      sin.set(t.sin, b * S * hd);
      lastRows[b] = BigInt(b * S + n - 1);
      for (let gi = 0; gi < grp; gi++) {
        for (let i = 0; i < S; i++) {
          const at = ((b * grp + gi) * S + i) * T;
          mask.fill(0, at, at + past);
          mask.fill(0, at + P, at + P + Math.min(i + 1, n));
        }
      }
    });
    const feeds: Record<string, Ort.Tensor> = {
      input_ids: new this.#ort.Tensor('int32', ids, [B, S]),
      cos: new this.#ort.Tensor('float32', cos, [B, S, hd]),
      sin: new this.#ort.Tensor('float32', sin, [B, S, hd]),
      mask: new this.#ort.Tensor('float32', mask, [B, grp * S, T]),
      last_rows: new this.#ort.Tensor('int64', lastRows, [B]),
    };
    for (let layer = 0; layer < L; layer++) {
      for (const kv of ['k', 'v'] as const) {
        if (layout !== undefined) {
          feeds[servingPastName(layer, kv)] = new this.#ort.Tensor('float32', layout[kv][layer], [B, nKv, P, hd]);
          continue;
        }
        const packed = this.#buffer(servingPastName(layer, kv), B * nKv * P * hd);
        if (P > 0) {
          rows.forEach((row, b) => {
            const s = row.sequence;
            const src = s[kv][layer];
            for (let h = 0; h < nKv; h++) packed.set(src.subarray(h * s.capacity * hd, (h * s.capacity + s.length) * hd), (b * nKv + h) * P * hd);
          });
        }
        feeds[servingPastName(layer, kv)] = new this.#ort.Tensor('float32', packed, [B, nKv, P, hd]);
      }
    }
    const loras: ServingLora[] = [];
    for (const row of rows) if (row.sequence.lora !== undefined && !loras.includes(row.sequence.lora)) loras.push(row.sequence.lora);
    const lora = this.#loraFeeds(loras);
    Object.assign(feeds, lora.feeds);
    for (const [name, { starts, k }] of lora.columns) {
      const sel = new Float32Array(B * S * k);
      rows.forEach((row, b) => {
        const l = row.sequence.lora;
        const start = l === undefined ? undefined : starts.get(l);
        if (l === undefined || start === undefined) return;
        for (let i = 0; i < S; i++) sel.fill(1, (b * S + i) * k + start, (b * S + i) * k + start + l.spec.r);
      });
      feeds[servingSelName(name as (typeof LINEAR_MODULES)[number])] = new this.#ort.Tensor('float32', sel, [B * S, k]);
    }
    const t1 = performance.now();
    const out = await this.#session.run(feeds);
    const t2 = performance.now();
    for (let layer = 0; layer < L; layer++) {
      for (const kv of ['k', 'v'] as const) {
        const fresh = out[servingNewName(layer, kv)].data as Float32Array;
        rows.forEach((row, b) => {
          const s = row.sequence;
          const dst = s[kv][layer];
          const n = row.ids.length;
          for (let h = 0; h < nKv; h++) dst.set(fresh.subarray(((b * nKv + h) * S) * hd, ((b * nKv + h) * S + n) * hd), (h * s.capacity + s.length) * hd);
          // The kept layout gets the new position too, while it has room for it.
          if (layout !== undefined && s.length < P) {
            const packed = layout[kv][layer];
            for (let h = 0; h < nKv; h++) packed.set(fresh.subarray((b * nKv + h) * hd, (b * nKv + h + 1) * hd), ((b * nKv + h) * P + s.length) * hd);
          }
        });
      }
    }
    for (const row of rows) row.sequence.length += row.ids.length;
    const logits = out.logits.data as Float32Array;
    const result = rows.map((_, b) => logits.slice(b * vocabSize, (b + 1) * vocabSize));
    this.timings.runs += 1;
    this.timings.packMs += t1 - t0;
    this.timings.graphMs += t2 - t1;
    this.timings.unpackMs += performance.now() - t2;
    return result;
  }

  async dispose(): Promise<void> {
    await this.#session.release();
  }
}
