// The frozen LLaMA-family backbone on ONNX Runtime: graphs built once per kind from the
// configuration (dynamic batch and sequence), weights given once as initializers, sessions
// cached. Tensors in and out are plain typed arrays in row-major order.
import { availableParallelism } from 'node:os';
import type * as Ort from 'onnxruntime-node';
import type { ModelConfig } from '../config.ts';
import { ModelError } from '../errors.ts';
import { LINEAR_MODULES } from '../hooks.ts';
import { ropeInverseFrequencies, ropeTables } from '../llama/rope.ts';
import type { LoraSpec, SegmentAdapterSpec, WeightArrays } from './llama-graphs.ts';
import { SAVED_PER_BLOCK, SEGMENT_LORA_SCALE, modulePath, blockRangeBackwardGraph, blocksRecomputeBackwardGraph, ia3GradName, ia3InputName, segmentBlocksGraph, bottomBackwardGraph, bottomGraph, cachedBlockRangeGraph, cachedLogitsGraph, pastName, presentName, blockRangeGraph, logitsGraph, loraGradNames, loraInputNames, loraPaths, loraTrainGraph, topLogitsGraph, topTrainGraph } from './llama-graphs.ts';
import type { OnnxGraph } from './onnx-proto.ts';
import { encodeModel } from './onnx-proto.ts';

export type OrtProvider = 'cpu' | 'cuda';

export interface OrtEngineOptions {
  /** Intra-op threads; defaults to the machine's cores. */
  threads?: number;
  provider?: OrtProvider;
}

type OrtModule = typeof Ort;
let ortModule: OrtModule | undefined;

/** Loads onnxruntime-node once; a missing or broken native library is a typed error. */
export async function loadOrt(): Promise<OrtModule> {
  if (!ortModule) {
    try {
      const m = (await import('onnxruntime-node')) as OrtModule & { default?: OrtModule };
      ortModule = m.InferenceSession ? m : (m.default as OrtModule);
    } catch (err) {
      throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `onnxruntime-node could not be loaded: ${(err as Error).message.split('\n')[0]}`, { field: 'engine', cause: err });
    }
  }
  return ortModule;
}

/**
 * Session options of the graphs that run one after another within a step (bottom, top, the
 * middle's forward, forward keeping and VJP). Each ORT session has its own intra-op thread pool,
 * and by default its threads spin for a while after a run: the last session's spinning threads
 * took the cores from the next one's. Measured on the 25M model (4 blocks, 4 x 128 tokens, 2
 * cores), alternating forward, forward keeping and VJP: 62 / 70 / 63 ms spinning, 35 / 45 / 48 ms
 * without. A graph that runs alone again and again (the whole model's LoRA step, logits, the
 * cached decode) keeps spinning: without it the SmolLM-shape forward lost 17%.
 */
export const ORT_NO_SPINNING = { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } } as const;

const MASKED = -1e9;

/** Sessions of the bounded set (see OrtLlama.runBounded) kept at once. */
export const MAX_BOUNDED_SESSIONS = 4;

/** A block-range forward whose saved tensors are kept for one later vector-Jacobian product. */
export interface KeptForward {
  readonly output: Float32Array;
  /** Bytes held for backward. */
  readonly savedBytes: number;
  /** dL/dh for dy = dL/d output, [batch, seq, hidden]. Frees what was kept. */
  vjp(dy: Float32Array): Promise<Float32Array>;
  dispose(): void;
}

/** LoRA parameters by module path, PEFT's layout: A [r, in], B [out, r]. */
export type LoraParams = Map<string, { a: Float32Array; b: Float32Array }>;

/** The top's training step: the weighted loss sum, its LoRA gradients and dL/dh when asked for. */
export interface TopStepResult {
  loss: number;
  /** Tokens the loss counts. */
  count: number;
  grads: LoraParams;
  dh?: Float32Array;
}

/** The bottom's forward; `backward` is there when it kept what its LoRA gradients need. */
export interface BottomForward {
  readonly output: Float32Array;
  backward?(dy: Float32Array): Promise<LoraParams>;
}

/**
 * The adapters of S segments of one stacked batch (a batch of S · batch' rows, segment k its
 * own batch' sequences), stacked along the segment axis: per LoRA path A [S, r, in] and B
 * [S, out, r] with each segment's lora_alpha / r; per (IA)^3 path the scales [S, n].
 */
export interface SegmentAdapters {
  segments: number;
  lora?: { r: number; scales: Float32Array; factors: ReadonlyMap<string, { a: Float32Array; b: Float32Array }> };
  ia3?: ReadonlyMap<string, { feedforward: boolean; scale: Float32Array }>;
}

/** Gradients of segment adapters, stacked as their inputs: LoRA A and B by path, (IA)^3 scales by path. */
export interface SegmentGradients {
  lora: Map<string, { a: Float32Array; b: Float32Array }>;
  ia3: Map<string, Float32Array>;
}

const segmentSpecOf = (a: SegmentAdapters): SegmentAdapterSpec => ({
  ...(a.lora && a.lora.factors.size > 0 ? { lora: { paths: [...a.lora.factors.keys()] } } : {}),
  ...(a.ia3 && a.ia3.size > 0 ? { ia3: [...a.ia3].map(([path, x]) => ({ path, feedforward: x.feedforward })) } : {}),
});
const segmentKey = (s: SegmentAdapterSpec): string => `${s.lora ? s.lora.paths.join(',') : ''}|${(s.ia3 ?? []).map((x) => `${x.path}:${x.feedforward ? 'in' : 'out'}`).join(',')}`;

const specKey = (spec: LoraSpec | undefined): string => (spec ? `${spec.r}:${spec.scaling}:${spec.modules.join(',')}:${spec.layers?.join(',') ?? 'all'}` : 'none');

export interface LoraStepResult {
  loss: number;
  /** Tokens the loss counts. */
  count: number;
  grads: LoraParams;
}

function checkTokens(config: ModelConfig, batch: number, seq: number, field: string): void {
  if (!Number.isInteger(batch) || batch < 1 || !Number.isInteger(seq) || seq < 1) {
    throw new ModelError('TANDEM_INPUT_INVALID', `batch and seq must be positive integers, got ${batch} x ${seq}`, { field });
  }
  if (seq > config.maxPositionEmbeddings) {
    throw new ModelError('TANDEM_INPUT_INVALID', `seq ${seq} exceeds max_position_embeddings ${config.maxPositionEmbeddings}`, { field });
  }
}

function checkLength(a: ArrayLike<number>, expected: number, field: string): void {
  if (a.length !== expected) throw new ModelError('TANDEM_INPUT_INVALID', `expected ${expected} values, got ${a.length}`, { field });
}

/** Keys and values of the positions already run, per block, for one batch of sequences. */
export class OrtKvCache {
  /** Positions held. */
  length = 0;
  tensors: Record<string, Ort.Tensor> | undefined;
}

function checkLoraSpec(config: ModelConfig, spec: LoraSpec): void {
  if (!Number.isInteger(spec.r) || spec.r < 1 || spec.r > 4096) throw new ModelError('TANDEM_INPUT_INVALID', `r must be an integer in [1, 4096], got ${spec.r}`, { field: 'r' });
  if (!Number.isFinite(spec.scaling)) throw new ModelError('TANDEM_INPUT_INVALID', `scaling must be finite, got ${spec.scaling}`, { field: 'scaling' });
  if (spec.modules.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'no target modules', { field: 'modules' });
  for (const m of spec.modules) {
    if (!(LINEAR_MODULES as readonly string[]).includes(m)) throw new ModelError('TANDEM_INPUT_INVALID', `unknown module ${JSON.stringify(m)}; one of ${LINEAR_MODULES.join(', ')}`, { field: 'modules' });
  }
  for (const l of spec.layers ?? []) {
    if (!Number.isInteger(l) || l < 0 || l >= config.numHiddenLayers) {
      throw new ModelError('TANDEM_INPUT_INVALID', `layer ${l} is outside [0, ${config.numHiddenLayers})`, { field: 'layers' });
    }
  }
}

export class OrtLlama {
  readonly config: ModelConfig;
  readonly threads: number;
  readonly provider: OrtProvider;
  private readonly invFreq: Float64Array;
  private readonly sessions = new Map<string, Promise<Ort.InferenceSession>>();
  private readonly bounded = new Map<string, { session: Promise<Ort.InferenceSession>; running: number }>();
  private weights: WeightArrays;

  private constructor(
    private readonly ort: OrtModule,
    config: ModelConfig,
    weights: WeightArrays,
    options: OrtEngineOptions,
  ) {
    this.config = config;
    this.weights = weights;
    this.threads = options.threads ?? availableParallelism();
    this.provider = options.provider ?? 'cpu';
    this.invFreq = ropeInverseFrequencies(config);
  }

  /** An engine over these weights (Hugging Face names, float32); the arrays must stay unchanged. */
  static async create(config: ModelConfig, weights: WeightArrays, options: OrtEngineOptions = {}): Promise<OrtLlama> {
    if (options.threads !== undefined && (!Number.isInteger(options.threads) || options.threads < 1 || options.threads > 1024)) {
      throw new ModelError('TANDEM_INPUT_INVALID', `threads must be an integer in [1, 1024], got ${options.threads}`, { field: 'threads' });
    }
    return new OrtLlama(await loadOrt(), config, weights, options);
  }

  /** Sessions built so far, by graph key (one per kind and block range; batch and seq are dynamic). */
  get sessionKeys(): string[] {
    return [...this.sessions.keys(), ...this.bounded.keys()];
  }

  /** `alternating`: a graph of a step that runs others between its runs (no spinning: see ORT_NO_SPINNING). */
  private createSession(build: () => OnnxGraph, alternating: boolean): Promise<Ort.InferenceSession> {
    return this.ort.InferenceSession.create(encodeModel(build()), {
      executionProviders: [this.provider],
      intraOpNumThreads: this.threads,
      interOpNumThreads: 1,
      executionMode: 'sequential',
      graphOptimizationLevel: 'all',
      ...(alternating ? { extra: ORT_NO_SPINNING } : {}),
    });
  }

  private session(key: string, build: () => OnnxGraph, alternating = true): Promise<Ort.InferenceSession> {
    let s = this.sessions.get(key);
    if (!s) {
      s = this.createSession(build, alternating);
      s.catch(() => this.sessions.delete(key));
      this.sessions.set(key, s);
    }
    return s;
  }

  /**
   * Runs a graph of the bounded set: the held adapters' graphs (one per block range and adapter
   * layout: their number is the tenants' to choose) and the recompute VJP. Each session holds
   * its own copy of the range's weights, so at most MAX_BOUNDED_SESSIONS stay; the least
   * recently used one not running is released.
   */
  private async runBounded(key: string, build: () => OnnxGraph, feeds: Record<string, Ort.Tensor>): Promise<Ort.InferenceSession.OnnxValueMapType> {
    let entry = this.bounded.get(key);
    if (entry) this.bounded.delete(key); // most recently used last
    else {
      const session = this.createSession(build, true);
      entry = { session, running: 0 };
      session.catch(() => { if (this.bounded.get(key)?.session === session) this.bounded.delete(key); });
    }
    this.bounded.set(key, entry);
    entry.running++;
    try {
      return await (await entry.session).run(feeds);
    } finally {
      entry.running--;
      this.evictBounded();
    }
  }

  private evictBounded(): void {
    for (const [key, entry] of this.bounded) {
      if (this.bounded.size <= MAX_BOUNDED_SESSIONS) return;
      if (entry.running > 0) continue;
      this.bounded.delete(key);
      entry.session.then((s) => s.release()).catch(() => undefined);
    }
  }

  private f32(data: Float32Array, dims: number[]): Ort.Tensor {
    return new this.ort.Tensor('float32', data, dims);
  }

  /** cos, sin [seq, headDim] for positions 0..seq-1 and the causal mask [group · seq, seq]. */
  private positional(seq: number, offset = 0): Record<string, Ort.Tensor> {
    const hd = this.config.headDim;
    const { cos, sin } = ropeTables(this.invFreq, offset, seq);
    const group = this.config.numAttentionHeads / this.config.numKeyValueHeads;
    const total = offset + seq;
    const mask = new Float32Array(group * seq * total);
    for (let gi = 0; gi < group; gi++) {
      for (let i = 0; i < seq; i++) {
        const row = (gi * seq + i) * total;
        for (let j = offset + i + 1; j < total; j++) mask[row + j] = MASKED;
      }
    }
    return { cos: this.f32(cos, [seq, hd]), sin: this.f32(sin, [seq, hd]), mask: this.f32(mask, [group * seq, total]) };
  }

  private ids(ids: Int32Array, batch: number, seq: number): Ort.Tensor {
    checkLength(ids, batch * seq, 'input_ids');
    const v = this.config.vocabSize;
    for (let i = 0; i < ids.length; i++) {
      if (!(ids[i] >= 0 && ids[i] < v)) throw new ModelError('TANDEM_INPUT_INVALID', `token id ${ids[i]} at ${i} is outside [0, ${v})`, { field: 'input_ids' });
    }
    return new this.ort.Tensor('int32', ids, [batch, seq]);
  }

  /** Token ids [batch, seq] → logits [batch, seq, vocab]. */
  async logits(ids: Int32Array, batch: number, seq: number): Promise<Float32Array> {
    checkTokens(this.config, batch, seq, 'input_ids');
    const s = await this.session('logits', () => logitsGraph(this.config, this.weights), false);
    const out = await s.run({ input_ids: this.ids(ids, batch, seq), ...this.positional(seq) });
    return out.logits.data as Float32Array;
  }

  private checkHidden(h: Float32Array, batch: number, seq: number, field: string): void {
    checkTokens(this.config, batch, seq, field);
    checkLength(h, batch * seq * this.config.hiddenSize, field);
  }

  /** Blocks [start, end) on h [batch, seq, hidden], nothing kept. */
  async blocks(h: Float32Array, batch: number, seq: number, start: number, end: number): Promise<Float32Array> {
    this.checkHidden(h, batch, seq, 'h');
    if (start === end) return h;
    const s = await this.session(`blocks:${start}:${end}`, () => blockRangeGraph(this.config, this.weights, start, end, false));
    const out = await s.run({ h: this.f32(h, [batch, seq, this.config.hiddenSize]), ...this.positional(seq) });
    return out.out.data as Float32Array;
  }

  /** Blocks [start, end) keeping what their backward needs; `vjp` runs the hand-derived backward graph. */
  async blocksKeep(h: Float32Array, batch: number, seq: number, start: number, end: number): Promise<KeptForward> {
    this.checkHidden(h, batch, seq, 'h');
    const d = this.config.hiddenSize;
    const fwd = await this.session(`blocks-keep:${start}:${end}`, () => blockRangeGraph(this.config, this.weights, start, end, true));
    const pos = this.positional(seq);
    const out = await fwd.run({ h: this.f32(h, [batch, seq, d]), ...pos });
    let saved: Record<string, Ort.Tensor> | undefined = {};
    let savedBytes = 0;
    for (const [name, t] of Object.entries(out)) {
      if (name === 'out') continue;
      saved[name] = t;
      savedBytes += (t.data as Float32Array).byteLength;
    }
    if (Object.keys(saved).length !== (end - start) * SAVED_PER_BLOCK) throw new Error('the forward graph did not return every saved tensor');
    return {
      output: out.out.data as Float32Array,
      savedBytes,
      vjp: async (dy: Float32Array): Promise<Float32Array> => {
        if (!saved) throw new ModelError('TANDEM_INPUT_INVALID', 'this forward pass was already used or freed', { field: 'vjp' });
        checkLength(dy, batch * seq * d, 'dy');
        const kept = saved;
        saved = undefined;
        const bwd = await this.session(`blocks-backward:${start}:${end}`, () => blockRangeBackwardGraph(this.config, this.weights, start, end));
        const r = await bwd.run({ dy: this.f32(dy, [batch, seq, d]), ...pos, ...kept });
        return r.dx.data as Float32Array;
      },
      dispose: () => {
        saved = undefined;
      },
    };
  }

  /** The segment adapters' inputs, checked against the weights, the blocks run and the batch. */
  private segmentFeeds(a: SegmentAdapters, batch: number, start: number, end: number): Record<string, Ort.Tensor> {
    const S = a.segments;
    if (!Number.isInteger(S) || S < 1 || batch % S !== 0) throw new ModelError('TANDEM_INPUT_INVALID', `segments must be a positive integer dividing the batch ${batch}, got ${S}`, { field: 'segments' });
    if ((a.lora?.factors.size ?? 0) + (a.ia3?.size ?? 0) === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'the segment adapters name no module', { field: 'adapters' });
    const feeds: Record<string, Ort.Tensor> = {};
    // A linear module (q_proj … down_proj) of a block in [start, end), whose weight is [out, in].
    const shapeOf = (path: string): [number, number] => {
      const layer = Number(path.split('.')[2]);
      const w = this.weights.get(`${path}.weight`);
      const linear = Number.isInteger(layer) && LINEAR_MODULES.some((m) => modulePath(layer, m) === path);
      if (!linear || !w || w.shape.length !== 2 || !(layer >= start && layer < end)) {
        throw new ModelError('TANDEM_INPUT_INVALID', `${path} is not a linear module of blocks [${start}, ${end})`, { field: 'adapters' });
      }
      return [w.shape[0], w.shape[1]];
    };
    if (a.lora && a.lora.factors.size > 0) {
      const { r } = a.lora;
      if (!Number.isInteger(r) || r < 1 || r > 4096) throw new ModelError('TANDEM_INPUT_INVALID', `r must be an integer in [1, 4096], got ${r}`, { field: 'r' });
      checkLength(a.lora.scales, S, SEGMENT_LORA_SCALE);
      feeds[SEGMENT_LORA_SCALE] = this.f32(a.lora.scales, [S, 1, 1]);
      for (const [path, f] of a.lora.factors) {
        const [out, inF] = shapeOf(path);
        if (a.ia3?.has(path)) throw new ModelError('TANDEM_INPUT_INVALID', `${path} carries both LoRA and (IA)^3`, { field: 'adapters' });
        const names = loraInputNames(path);
        checkLength(f.a, S * r * inF, names.a);
        checkLength(f.b, S * out * r, names.b);
        feeds[names.a] = this.f32(f.a, [S, r, inF]);
        feeds[names.b] = this.f32(f.b, [S, out, r]);
      }
    }
    for (const [path, x] of a.ia3 ?? []) {
      const [out, inF] = shapeOf(path);
      const n = x.feedforward ? inF : out;
      checkLength(x.scale, S * n, ia3InputName(path));
      feeds[ia3InputName(path)] = this.f32(x.scale, [S, 1, n]);
    }
    return feeds;
  }

  /** Blocks [start, end) on a stacked batch h [S · batch', seq, hidden], segment k with its own adapters (SegmentAdapters). */
  async blocksSegments(h: Float32Array, batch: number, seq: number, start: number, end: number, adapters: SegmentAdapters): Promise<Float32Array> {
    this.checkHidden(h, batch, seq, 'h');
    const feeds = this.segmentFeeds(adapters, batch, start, end);
    const spec = segmentSpecOf(adapters);
    const out = await this.runBounded(`segment-blocks:${start}:${end}:${segmentKey(spec)}`, () => segmentBlocksGraph(this.config, this.weights, spec, start, end),
      { h: this.f32(h, [batch, seq, this.config.hiddenSize]), ...this.positional(seq), ...feeds });
    return out.out.data as Float32Array;
  }

  /**
   * dL/dh of blocks [start, end) for dy = dL/d output, recomputing the forward from h inside one
   * graph (nothing saved crosses into JS); with `adapters` (a stacked batch, as blocksSegments)
   * also the gradients of every segment's adapter, stacked as given.
   */
  async blocksRecomputeBackward(h: Float32Array, dy: Float32Array, batch: number, seq: number, start: number, end: number, adapters?: SegmentAdapters): Promise<{ dx: Float32Array; grads: SegmentGradients }> {
    this.checkHidden(h, batch, seq, 'h');
    checkLength(dy, h.length, 'dy');
    const d = this.config.hiddenSize;
    const grads: SegmentGradients = { lora: new Map(), ia3: new Map() };
    if (start === end && adapters === undefined) return { dx: dy, grads };
    const feeds = adapters ? this.segmentFeeds(adapters, batch, start, end) : {};
    const spec = adapters ? segmentSpecOf(adapters) : undefined;
    const key = `blocks-recompute-backward:${start}:${end}:${spec ? segmentKey(spec) : 'none'}`;
    const out = await this.runBounded(key, () => blocksRecomputeBackwardGraph(this.config, this.weights, spec, start, end),
      { h: this.f32(h, [batch, seq, d]), dy: this.f32(dy, [batch, seq, d]), ...this.positional(seq), ...feeds });
    for (const path of adapters?.lora?.factors.keys() ?? []) {
      const names = loraGradNames(path);
      grads.lora.set(path, { a: out[names.a].data as Float32Array, b: out[names.b].data as Float32Array });
    }
    for (const path of adapters?.ia3?.keys() ?? []) grads.ia3.set(path, out[ia3GradName(path)].data as Float32Array);
    return { dx: out.dx.data as Float32Array, grads };
  }

  /**
   * Causal-LM targets of labels [batch, seq]: position t predicts labels[t + 1]; -100 is
   * ignored. Each counted position weighs `tokenWeight` (1/count, the mean, when absent).
   */
  private targets(labels: Int32Array, batch: number, seq: number, tokenWeight?: number): { feeds: Record<string, Ort.Tensor>; count: number } {
    checkLength(labels, batch * seq, 'labels');
    if (tokenWeight !== undefined && !Number.isFinite(tokenWeight)) throw new ModelError('TANDEM_INPUT_INVALID', `tokenWeight must be finite, got ${tokenWeight}`, { field: 'tokenWeight' });
    const n = batch * seq;
    const targets = new Int32Array(n);
    const weights = new Float32Array(n);
    let count = 0;
    for (let b = 0; b < batch; b++) {
      for (let t = 0; t + 1 < seq; t++) {
        const label = labels[b * seq + t + 1];
        if (label === -100) continue;
        if (!(label >= 0 && label < this.config.vocabSize)) {
          throw new ModelError('TANDEM_INPUT_INVALID', `label ${label} is outside [0, ${this.config.vocabSize}) and is not -100`, { field: 'labels' });
        }
        targets[b * seq + t] = label;
        count++;
      }
    }
    const w = tokenWeight ?? (count === 0 ? 0 : 1 / count);
    for (let b = 0; b < batch; b++) {
      for (let t = 0; t + 1 < seq; t++) if (labels[b * seq + t + 1] !== -100) weights[b * seq + t] = w;
    }
    return { feeds: { targets: new this.ort.Tensor('int32', targets, [n]), weights: this.f32(weights, [n]) }, count };
  }

  /** The LoRA inputs of the paths of `spec` in blocks [start, end), checked against the weights. */
  private loraFeeds(spec: LoraSpec | undefined, params: LoraParams | undefined, start: number, end: number): { feeds: Record<string, Ort.Tensor>; paths: string[] } {
    if (!spec) return { feeds: {}, paths: [] };
    checkLoraSpec(this.config, spec);
    const paths = loraPaths(this.config, spec).filter((p) => {
      const layer = Number(p.split('.')[2]);
      return layer >= start && layer < end;
    });
    const feeds: Record<string, Ort.Tensor> = {};
    for (const path of paths) {
      const p = params?.get(path);
      const w = this.weights.get(`${path}.weight`);
      if (!p || !w) throw new ModelError('TANDEM_INPUT_INVALID', `LoRA parameters for ${path} are missing`, { field: 'params' });
      checkLength(p.a, spec.r * w.shape[1], `${path}.lora_A`);
      checkLength(p.b, w.shape[0] * spec.r, `${path}.lora_B`);
      const names = loraInputNames(path);
      feeds[names.a] = this.f32(p.a, [spec.r, w.shape[1]]);
      feeds[names.b] = this.f32(p.b, [w.shape[0], spec.r]);
    }
    return { feeds, paths };
  }

  private gradsOf(out: Record<string, Ort.Tensor>, paths: readonly string[]): LoraParams {
    const grads: LoraParams = new Map();
    for (const path of paths) {
      const names = loraGradNames(path);
      grads.set(path, { a: out[names.a].data as Float32Array, b: out[names.b].data as Float32Array });
    }
    return grads;
  }

  /**
   * Loss and LoRA gradients of one micro-batch, all in ONNX Runtime: forward of the whole
   * model, causal-LM cross-entropy (position t predicts labels[t + 1]; -100 is ignored),
   * backward through the frozen weights to every A and B.
   */
  async loraStep(ids: Int32Array, labels: Int32Array, batch: number, seq: number, spec: LoraSpec, params: LoraParams): Promise<LoraStepResult> {
    checkTokens(this.config, batch, seq, 'input_ids');
    const { feeds: targetFeeds, count } = this.targets(labels, batch, seq);
    const lora = this.loraFeeds(spec, params, 0, this.config.numHiddenLayers);
    const s = await this.session(`lora:${specKey(spec)}`, () => loraTrainGraph(this.config, this.weights, spec), false);
    const out = await s.run({ input_ids: this.ids(ids, batch, seq), ...targetFeeds, ...this.positional(seq), ...lora.feeds });
    return { loss: count === 0 ? 0 : (out.loss.data as Float32Array)[0], count, grads: this.gradsOf(out, lora.paths) };
  }

  /**
   * The top of the cut in training: h [batch, seq, hidden] at block `start` → blocks
   * [start, L), norm, head and the causal-LM loss; backward to the LoRA parameters of those
   * blocks and, with `withDh`, to h. The loss is the sum over counted tokens, each weighted
   * `tokenWeight` (1/count when absent, the mean).
   */
  async topStep(h: Float32Array, labels: Int32Array, batch: number, seq: number, start: number, spec: LoraSpec | undefined, params: LoraParams | undefined, options: { tokenWeight?: number; withDh?: boolean } = {}): Promise<TopStepResult> {
    this.checkHidden(h, batch, seq, 'h');
    this.checkStart(start);
    const withDh = options.withDh ?? true;
    const { feeds: targetFeeds, count } = this.targets(labels, batch, seq, options.tokenWeight);
    const lora = this.loraFeeds(spec, params, start, this.config.numHiddenLayers);
    const s = await this.session(`top:${start}:${withDh}:${specKey(spec)}`, () => topTrainGraph(this.config, this.weights, spec, { from: 'hidden', start }, withDh));
    const out = await s.run({ h: this.f32(h, [batch, seq, this.config.hiddenSize]), ...targetFeeds, ...this.positional(seq), ...lora.feeds });
    return { loss: (out.loss.data as Float32Array)[0], count, grads: this.gradsOf(out, lora.paths), ...(withDh ? { dh: out.dh.data as Float32Array } : {}) };
  }

  /** h [batch, seq, hidden] at block `start` → blocks [start, L) (with LoRA), norm, head → logits [batch, seq, vocab]. */
  async topLogits(h: Float32Array, batch: number, seq: number, start: number, spec?: LoraSpec, params?: LoraParams): Promise<Float32Array> {
    this.checkHidden(h, batch, seq, 'h');
    this.checkStart(start);
    const lora = this.loraFeeds(spec, params, start, this.config.numHiddenLayers);
    const s = await this.session(`top-logits:${start}:${specKey(spec)}`, () => topLogitsGraph(this.config, this.weights, spec, start));
    const out = await s.run({ h: this.f32(h, [batch, seq, this.config.hiddenSize]), ...this.positional(seq), ...lora.feeds });
    return out.logits.data as Float32Array;
  }

  /**
   * The bottom of the cut: ids [batch, seq] → embedding and blocks [0, end) (with LoRA) → h.
   * With `keep`, `backward(dy)` then gives the gradients of the bottom's LoRA parameters.
   */
  async bottom(ids: Int32Array, batch: number, seq: number, end: number, spec: LoraSpec | undefined, params: LoraParams | undefined, keep: boolean): Promise<BottomForward> {
    checkTokens(this.config, batch, seq, 'input_ids');
    if (!Number.isInteger(end) || end < 0 || end > this.config.numHiddenLayers) {
      throw new ModelError('TANDEM_INPUT_INVALID', `bottom blocks ${end} is outside [0, ${this.config.numHiddenLayers}]`, { field: 'end' });
    }
    const lora = this.loraFeeds(spec, params, 0, end);
    const withBackward = keep && spec !== undefined && lora.paths.length > 0;
    const fwd = await this.session(`bottom:${end}:${withBackward}:${specKey(spec)}`, () => bottomGraph(this.config, this.weights, spec, end, withBackward));
    const pos = this.positional(seq);
    const out = await fwd.run({ input_ids: this.ids(ids, batch, seq), ...pos, ...lora.feeds });
    if (!withBackward) return { output: out.out.data as Float32Array };
    let saved: Record<string, Ort.Tensor> | undefined = {};
    for (const [name, t] of Object.entries(out)) if (name !== 'out') saved[name] = t;
    const d = this.config.hiddenSize;
    return {
      output: out.out.data as Float32Array,
      backward: async (dy: Float32Array): Promise<LoraParams> => {
        if (!saved) throw new ModelError('TANDEM_INPUT_INVALID', 'this forward pass was already used or freed', { field: 'backward' });
        checkLength(dy, batch * seq * d, 'dy');
        const kept = saved;
        saved = undefined;
        const bwd = await this.session(`bottom-backward:${end}:${specKey(spec)}`, () => bottomBackwardGraph(this.config, this.weights, spec as LoraSpec, end));
        const r = await bwd.run({ dy: this.f32(dy, [batch, seq, d]), ...pos, ...kept, ...lora.feeds });
        return this.gradsOf(r, lora.paths);
      },
    };
  }

  private checkStart(start: number): void {
    if (!Number.isInteger(start) || start < 0 || start > this.config.numHiddenLayers) {
      throw new ModelError('TANDEM_INPUT_INVALID', `top start ${start} is outside [0, ${this.config.numHiddenLayers}]`, { field: 'start' });
    }
  }

  /**
   * The next positions of sequences whose earlier positions are in `cache`: ids [batch, seq]
   * → logits of the last position [batch, vocab]; the cache grows by seq.
   */
  async logitsCached(ids: Int32Array, batch: number, seq: number, cache: OrtKvCache): Promise<Float32Array> {
    checkTokens(this.config, batch, cache.length + seq, 'input_ids');
    const s = await this.session('logits-cached', () => cachedLogitsGraph(this.config, this.weights), false);
    const past = this.pastOf(cache, batch, 0, this.config.numHiddenLayers, 'input_ids');
    const out = await s.run({ input_ids: this.ids(ids, batch, seq), ...this.positional(seq, cache.length), ...past });
    this.grow(cache, out, seq, 0, this.config.numHiddenLayers);
    return out.logits.data as Float32Array;
  }

  /**
   * Blocks [start, end) on the next positions' h [batch, seq, hidden] of sequences whose earlier
   * positions are in `cache` (which must have been grown by this range only) → h [batch, seq,
   * hidden]; the cache grows by seq. Split inference's middle.
   */
  async blocksCached(h: Float32Array, batch: number, seq: number, start: number, end: number, cache: OrtKvCache): Promise<Float32Array> {
    checkTokens(this.config, batch, cache.length + seq, 'h');
    checkLength(h, batch * seq * this.config.hiddenSize, 'h');
    const s = await this.session(`blocks-cached:${start}:${end}`, () => cachedBlockRangeGraph(this.config, this.weights, start, end));
    const past = this.pastOf(cache, batch, start, end, 'h');
    const out = await s.run({ h: this.f32(h, [batch, seq, this.config.hiddenSize]), ...this.positional(seq, cache.length), ...past });
    this.grow(cache, out, seq, start, end);
    return out.out.data as Float32Array;
  }

  /** The cache's keys and values of blocks [start, end) as the cached graphs' inputs (empty ones at first). */
  private pastOf(cache: OrtKvCache, batch: number, start: number, end: number, field: string): Record<string, Ort.Tensor> {
    const { numKeyValueHeads: nKv, headDim: hd } = this.config;
    if (cache.tensors === undefined) {
      const empty = this.f32(new Float32Array(0), [batch, nKv, 0, hd]);
      const past: Record<string, Ort.Tensor> = {};
      for (let i = start; i < end; i++) {
        past[pastName(i, 'k')] = empty;
        past[pastName(i, 'v')] = empty;
      }
      return past;
    }
    const first = cache.tensors[pastName(start, 'k')];
    if (first === undefined || Object.keys(cache.tensors).length !== 2 * (end - start)) {
      throw new ModelError('TANDEM_INPUT_INVALID', `the cache holds other blocks than [${start}, ${end})`, { field });
    }
    if (first.dims[0] !== batch) throw new ModelError('TANDEM_INPUT_INVALID', `the cache holds batch ${first.dims[0]}, got ${batch}`, { field });
    return cache.tensors;
  }

  private grow(cache: OrtKvCache, out: Ort.InferenceSession.OnnxValueMapType, seq: number, start: number, end: number): void {
    const next: Record<string, Ort.Tensor> = {};
    for (let i = start; i < end; i++) {
      for (const kv of ['k', 'v'] as const) next[pastName(i, kv)] = out[presentName(i, kv)] as Ort.Tensor;
    }
    cache.tensors = next;
    cache.length += seq;
  }

  /** Greedy continuation of one prompt with the KV cache: the new ids, stopping at an EOS id when given. */
  async generateGreedy(prompt: readonly number[], maxNewTokens: number, eosTokenIds: readonly number[] = []): Promise<number[]> {
    if (prompt.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'the prompt is empty', { field: 'prompt' });
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) {
      throw new ModelError('TANDEM_INPUT_INVALID', `maxNewTokens must be a non-negative integer, got ${maxNewTokens}`, { field: 'maxNewTokens' });
    }
    const cache = new OrtKvCache();
    const v = this.config.vocabSize;
    const out: number[] = [];
    let input = Int32Array.from(prompt);
    while (out.length < maxNewTokens) {
      const logits = await this.logitsCached(input, 1, input.length, cache);
      let best = 0;
      for (let j = 1; j < v; j++) if (logits[j] > logits[best]) best = j;
      out.push(best);
      if (eosTokenIds.includes(best)) break;
      input = Int32Array.of(best);
    }
    return out;
  }

  /** Releases every session. */
  async dispose(): Promise<void> {
    const all = [...this.sessions.values(), ...[...this.bounded.values()].map((e) => e.session)];
    this.sessions.clear();
    this.bounded.clear();
    for (const s of all) {
      try {
        await (await s).release();
      } catch {
        // A session that failed to build holds nothing.
      }
    }
  }
}
