// Runs the frozen middle blocks [B, L-T) of a model in this thread: forward, and the
// vector-Jacobian product g_B = (d middle / d h_B)^T g_M, either from the tape the forward
// kept or by recomputing the forward from h_B (after an eviction or a restart). The node
// runs it inside its compute workers (middle-worker.ts), never on its event loop. Two
// implementations of one interface: tfjs (MiddleCompute) and ONNX Runtime (OrtMiddleCompute).
import { OrtMiddleExecutor, PackedBlocks, gradients, segmentIa3Delta, segmentLoraDelta, sumDeltas, tapedForward, tf } from '../model/index.ts';
import type { Ia3Scale, KeptForward, LlamaModel, LoraFactors, OrtLlama, PackedLinearDelta, SegmentAdapters, SegmentIa3, SegmentLora, TapedForward } from '../model/index.ts';
import { splitFloat32 } from '../common/split-float32.ts';

export type Shape3 = [number, number, number];

export interface BlockRange {
  start: number;
  end: number;
}

/** What a forward kept for its backward (a tfjs tape or ORT's saved tensors). */
export interface Kept {
  readonly savedBytes: number;
  dispose(): void;
}

/** One module's LoRA factors of a held adapter, as plain arrays that cross to a worker. */
export interface HeldModule {
  /** `model.layers.{i}.{self_attn|mlp}.{name}`. */
  path: string;
  /** A [r, in], row-major. */
  a: Float32Array;
  /** B [out, r], row-major. */
  b: Float32Array;
  r: number;
  inFeatures: number;
  outFeatures: number;
}

/** One module's (IA)^3 scale of a held adapter: [out] scaling the output, or [in] scaling the input (feedforward). */
export interface HeldIa3Module {
  path: string;
  feedforward: boolean;
  scale: Float32Array;
}

/**
 * The middle adapter the cloud holds for a session (held-adapters.ts): LoRA factors or (IA)^3
 * scales, applied in its forward, their gradients returned by its backward (in the order of
 * `modules`, A then B each, then of `ia3`).
 */
export interface HeldLora {
  /** lora_alpha / r. */
  scale: number;
  modules: HeldModule[];
  ia3?: HeldIa3Module[];
}

/** One request of a packed batch: h_B (and g_M for a backward) of one session. */
export interface BatchItem {
  range: BlockRange;
  h: Float32Array;
  shape: Shape3;
  g?: Float32Array;
  /** The session's held middle LoRA, when it has one. */
  lora?: HeldLora;
}

/** A packed backward's results: g_B per item, and for an item with a held LoRA the gradients of its factors (A then B of each module, in its order). */
export interface PackedBackward {
  gs: Float32Array[];
  loraGrads: (Float32Array[] | undefined)[];
}

/** The middle's computations, whatever runs them. */
export interface Compute<K extends Kept = Kept> {
  forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array>;
  forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: K }>;
  backwardFromTape(tape: K, g: Float32Array, shape: Shape3): Promise<Float32Array>;
  backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array>;
  /**
   * Packed batches (optional: without them the worker runs a batch's requests one by one):
   * one backbone pass for many requests, their tokens concatenated, attention within each
   * sequence. The tape of a packed forward is one for all its requests; its backward takes
   * every request's g_M at once (undefined: zeros, that request's g_B is then not wanted).
   */
  /** Whether these items can share one packed call (all of them, when absent). */
  canPack?(items: readonly BatchItem[]): boolean;
  forwardPacked?(items: readonly BatchItem[], keepTape: boolean): Promise<{ outputs: Float32Array[]; tape?: K }>;
  backwardPackedFromTape?(tape: K, gs: readonly (Float32Array | undefined)[]): Promise<Float32Array[]>;
  backwardPacked?(items: readonly BatchItem[]): Promise<Float32Array[]>;
  /** Packed forward and backward of items with held adapters: no tape, the backward recomputes. */
  forwardHeld?(items: readonly BatchItem[]): Promise<Float32Array[]>;
  backwardHeld?(items: readonly BatchItem[]): Promise<PackedBackward>;
}

/** Each item's held adapter as tensors (undefined for an item without), and all its trainable tensors in order. */
function loraTensors(items: readonly BatchItem[]): { loras: (SegmentLora | undefined)[]; ia3s: (SegmentIa3 | undefined)[]; factors: tf.Tensor2D[] } {
  const factors: tf.Tensor2D[] = [];
  const loras: (SegmentLora | undefined)[] = [];
  const ia3s: (SegmentIa3 | undefined)[] = [];
  for (const it of items) {
    if (it.lora === undefined || it.lora.modules.length === 0) loras.push(undefined);
    else {
      const map = new Map<string, LoraFactors>();
      for (const m of it.lora.modules) {
        const a = tf.tensor2d(m.a, [m.r, m.inFeatures]);
        const b = tf.tensor2d(m.b, [m.outFeatures, m.r]);
        factors.push(a, b);
        map.set(m.path, { a, b, scale: it.lora.scale });
      }
      loras.push(map);
    }
    if (it.lora?.ia3 === undefined || it.lora.ia3.length === 0) ia3s.push(undefined);
    else {
      const map = new Map<string, Ia3Scale>();
      for (const m of it.lora.ia3) {
        const scale = tf.tensor2d(m.scale, [1, m.scale.length]);
        factors.push(scale);
        map.set(m.path, { scale, feedforward: m.feedforward });
      }
      ia3s.push(map);
    }
  }
  return { loras, ia3s, factors };
}

/** A packed forward's tape: the rows of each request, in order. */
interface PackedTape extends Kept {
  readonly taped: TapedForward;
  readonly rows: readonly number[];
  readonly hidden: number;
}

/** Concatenates arrays (one request's rows after another's). */
function concat(parts: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** An ORT forward of several requests stacked along the batch axis: one set of saved tensors. */
interface StackedKept extends Kept {
  readonly kept: KeptForward;
  readonly lengths: readonly number[];
}

/** Whether an item holds an adapter with at least one module. */
const holds = (it: BatchItem): boolean => it.lora !== undefined && (it.lora.modules.length > 0 || (it.lora.ia3?.length ?? 0) > 0);

/** Held items that can share one stacked ORT run: one block range, batch and seq, one adapter layout. */
function heldGroupKey(it: BatchItem): string {
  const l = it.lora as HeldLora;
  const lora = l.modules.map((m) => `${m.path}:${m.r}`).join(',');
  const ia3 = (l.ia3 ?? []).map((m) => `${m.path}:${m.feedforward ? 'in' : 'out'}`).join(',');
  return `${it.range.start}:${it.range.end}:${it.shape[0]}:${it.shape[1]}|${lora}|${ia3}`;
}

/** The indices of the items holding an adapter, grouped by heldGroupKey: groups and members in arrival order. */
function heldGroups(items: readonly BatchItem[]): number[][] {
  const groups = new Map<string, number[]>();
  items.forEach((it, k) => {
    if (!holds(it)) return;
    const id = heldGroupKey(it);
    const g = groups.get(id);
    if (g === undefined) groups.set(id, [k]);
    else g.push(k);
  });
  return [...groups.values()];
}

/** The held adapters of one group (one layout), stacked along the segment axis in the group's order. */
function stackAdapters(group: readonly BatchItem[]): SegmentAdapters {
  const helds = group.map((it) => it.lora as HeldLora);
  const [first] = helds;
  const adapters: SegmentAdapters = { segments: group.length };
  if (first.modules.length > 0) {
    const r = first.modules[0].r;
    if (first.modules.some((m) => m.r !== r)) throw new Error('a held LoRA whose modules differ in rank');
    const factors = new Map(first.modules.map((m, j) => [m.path, { a: concat(helds.map((l) => l.modules[j].a)), b: concat(helds.map((l) => l.modules[j].b)) }]));
    adapters.lora = { r, scales: Float32Array.from(helds, (l) => l.scale), factors };
  }
  if (first.ia3 !== undefined && first.ia3.length > 0) {
    adapters.ia3 = new Map(first.ia3.map((m, j) => [m.path, { feedforward: m.feedforward, scale: concat(helds.map((l) => (l.ia3 as HeldIa3Module[])[j].scale)) }]));
  }
  return adapters;
}

/**
 * The middle on ONNX Runtime: the same four operations, the saved tensors kept in place of a
 * tape. Requests of one block range and one sequence length are batched by stacking them
 * along the batch axis (the graphs take any batch), one ORT run for them all.
 */
export class OrtMiddleCompute implements Compute<KeptForward | StackedKept> {
  readonly #exec: OrtMiddleExecutor;

  constructor(engine: OrtLlama) {
    this.#exec = new OrtMiddleExecutor(engine);
  }

  forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array> {
    return this.#exec.forward(range, h, shape);
  }

  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: KeptForward }> {
    const { output, kept } = await this.#exec.forwardKeeping(range, h, shape);
    return { output, tape: kept };
  }

  backwardFromTape(tape: KeptForward | StackedKept, g: Float32Array): Promise<Float32Array> {
    return 'lengths' in tape ? tape.kept.vjp(g) : this.#exec.backwardFromKept(tape, g);
  }

  backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    return this.#exec.backward(range, h, g, shape);
  }

  canPack(items: readonly BatchItem[]): boolean {
    const [first] = items;
    return items.every((it) => it.range.start === first.range.start && it.range.end === first.range.end && it.shape[1] === first.shape[1]);
  }

  #stacked(items: readonly BatchItem[]): Shape3 {
    const [first] = items;
    return [items.reduce((n, it) => n + it.shape[0], 0), first.shape[1], first.shape[2]];
  }

  async forwardPacked(items: readonly BatchItem[], keepTape: boolean): Promise<{ outputs: Float32Array[]; tape?: StackedKept }> {
    const lengths = items.map((it) => it.h.length);
    const h = concat(items.map((it) => it.h));
    if (!keepTape) return { outputs: splitFloat32(await this.#exec.forward(items[0].range, h, this.#stacked(items)), lengths) };
    const { output, kept } = await this.#exec.forwardKeeping(items[0].range, h, this.#stacked(items));
    return { outputs: splitFloat32(output, lengths), tape: { kept, lengths, savedBytes: kept.savedBytes, dispose: () => kept.dispose() } };
  }

  async backwardPackedFromTape(tape: KeptForward | StackedKept, gs: readonly (Float32Array | undefined)[]): Promise<Float32Array[]> {
    if (!('lengths' in tape)) throw new Error('not a stacked tape');
    const g = concat(tape.lengths.map((n, k) => gs[k] ?? new Float32Array(n)));
    return splitFloat32(await tape.kept.vjp(g), tape.lengths);
  }

  async backwardPacked(items: readonly BatchItem[]): Promise<Float32Array[]> {
    const h = concat(items.map((it) => it.h));
    const g = concat(items.map((it) => it.g ?? new Float32Array(it.h.length)));
    return splitFloat32(await this.#exec.backward(items[0].range, h, g, this.#stacked(items)), items.map((it) => it.h.length));
  }

  /**
   * Items with held adapters: those of one block range, shape and adapter layout stacked into
   * one run (the base matmuls once for all their rows, each adapter's part a batched matmul
   * over the segments), other layouts in runs of their own; an item without one runs plain.
   */
  async forwardHeld(items: readonly BatchItem[]): Promise<Float32Array[]> {
    const outputs: Float32Array[] = [];
    for (const [k, it] of items.entries()) if (!holds(it)) outputs[k] = await this.forward(it.range, it.h, it.shape);
    for (const indices of heldGroups(items)) {
      const group = indices.map((k) => items[k]);
      const [b, seq, d] = group[0].shape;
      const { start, end } = group[0].range;
      const out = await this.#exec.engine.blocksSegments(concat(group.map((it) => it.h)), b * group.length, seq, start, end, stackAdapters(group));
      splitFloat32(out, group.map(() => b * seq * d)).forEach((o, j) => { outputs[indices[j]] = o; });
    }
    return outputs;
  }

  /** g_B of every item, recomputing the forward in the backward's graph, and each held adapter's gradients (A then B per module, then the (IA)^3 scales). */
  async backwardHeld(items: readonly BatchItem[]): Promise<PackedBackward> {
    const gs: Float32Array[] = [];
    const loraGrads: (Float32Array[] | undefined)[] = items.map(() => undefined);
    const zeros = (it: BatchItem): Float32Array => it.g ?? new Float32Array(it.h.length);
    // Items without an adapter (a backward batch mixes them with held ones): stacked when they can pack.
    const plain = new Map<string, number[]>();
    items.forEach((it, k) => {
      if (holds(it)) return;
      if (it.lora !== undefined) loraGrads[k] = [];
      const id = `${it.range.start}:${it.range.end}:${it.shape[1]}`;
      plain.set(id, [...(plain.get(id) ?? []), k]);
    });
    for (const indices of plain.values()) {
      const group = indices.map((k) => items[k]);
      const outs = group.length > 1 ? await this.backwardPacked(group) : [await this.backward(group[0].range, group[0].h, zeros(group[0]), group[0].shape)];
      outs.forEach((o, j) => { gs[indices[j]] = o; });
    }
    for (const indices of heldGroups(items)) {
      const group = indices.map((k) => items[k]);
      const [b, seq, d] = group[0].shape;
      const { start, end } = group[0].range;
      const { dx, grads } = await this.#exec.engine.blocksRecomputeBackward(concat(group.map((it) => it.h)), concat(group.map(zeros)), b * group.length, seq, start, end, stackAdapters(group));
      const dxs = splitFloat32(dx, group.map(() => b * seq * d));
      group.forEach((it, j) => {
        const k = indices[j];
        const l = it.lora as HeldLora;
        // Segment j's part of each stacked gradient, copied (it crosses to the node's thread on its own).
        const part = (all: Float32Array): Float32Array => {
          const n = all.length / group.length;
          return all.slice(j * n, (j + 1) * n);
        };
        const out: Float32Array[] = [];
        for (const m of l.modules) {
          const g = grads.lora.get(m.path);
          if (g === undefined) throw new Error(`no gradient for ${m.path}`);
          out.push(part(g.a), part(g.b));
        }
        for (const m of l.ia3 ?? []) {
          const g = grads.ia3.get(m.path);
          if (g === undefined) throw new Error(`no gradient for ${m.path}`);
          out.push(part(g));
        }
        gs[k] = dxs[j];
        loraGrads[k] = out;
      });
    }
    return { gs, loraGrads };
  }
}

export class MiddleCompute implements Compute<TapedForward | PackedTape> {
  readonly #model: LlamaModel;
  readonly #packed: PackedBlocks;

  constructor(model: LlamaModel) {
    this.#model = model;
    this.#packed = new PackedBlocks(model);
  }

  /** Packs the items' rows and runs their blocks in one pass; the output is every item's rows, concatenated. */
  #packedRun(items: readonly BatchItem[], inputs: tf.Tensor2D[], delta?: PackedLinearDelta): tf.Tensor2D {
    const segments = items.map((it) => ({ start: it.range.start, end: it.range.end, batch: it.shape[0], seq: it.shape[1] }));
    const outs = this.#packed.run(inputs, segments, delta);
    return (outs.length === 1 ? outs[0] : tf.concat(outs, 0)) as tf.Tensor2D;
  }

  #inputs(items: readonly BatchItem[]): tf.Tensor2D[] {
    return items.map((it) => tf.tensor2d(it.h, [it.shape[0] * it.shape[1], it.shape[2]]));
  }

  async forwardPacked(items: readonly BatchItem[], keepTape: boolean): Promise<{ outputs: Float32Array[]; tape?: PackedTape }> {
    const rows = items.map((it) => it.shape[0] * it.shape[1]);
    const hidden = items[0].shape[2];
    const split = (all: Float32Array): Float32Array[] => splitFloat32(all, rows.map((r) => r * hidden));
    if (!keepTape) {
      const out = tf.tidy(() => this.#packedRun(items, this.#inputs(items)));
      try {
        return { outputs: split((await out.data()) as Float32Array) };
      } finally {
        out.dispose();
      }
    }
    const inputs = this.#inputs(items);
    let taped: TapedForward;
    try {
      taped = tapedForward(() => this.#packedRun(items, inputs), inputs);
    } finally {
      tf.dispose(inputs);
    }
    try {
      const outputs = split((await taped.output.data()) as Float32Array);
      const tape: PackedTape = { taped, rows, hidden, savedBytes: taped.savedBytes, dispose: () => taped.dispose() };
      return { outputs, tape };
    } catch (err) {
      taped.dispose();
      throw err;
    }
  }

  async backwardPackedFromTape(tape: TapedForward | PackedTape, gs: readonly (Float32Array | undefined)[]): Promise<Float32Array[]> {
    if (!('rows' in tape)) throw new Error('not a packed tape');
    const { rows, hidden } = tape;
    const dy = tf.tidy(() => tf.concat(rows.map((r, k) => (gs[k] === undefined ? tf.zeros([r, hidden]) : tf.tensor2d(gs[k], [r, hidden]))), 0));
    let grads: tf.Tensor[];
    try {
      grads = tape.taped.vjp(dy);
    } finally {
      dy.dispose();
    }
    try {
      return await Promise.all(grads.map(async (g) => (await g.data()) as Float32Array));
    } finally {
      tf.dispose(grads);
    }
  }

  /** The held adapters' addition to the base: LoRAs (segment-lora) and (IA)^3 scales (segment-ia3). */
  #heldDelta(loras: (SegmentLora | undefined)[], ia3s: (SegmentIa3 | undefined)[]): PackedLinearDelta {
    const lora = segmentLoraDelta(loras);
    if (ia3s.every((x) => x === undefined)) return lora;
    // Called inside the forward's tidy: the reshapes are views freed with it.
    const weightOf = (path: string) => {
      const w = this.#model.weight(`${path}.weight`);
      return {
        weight: tf.reshape(w, [w.shape[0], w.shape[1] ?? 1]) as tf.Tensor2D,
        ...(this.#model.weights.has(`${path}.bias`) ? { bias: tf.reshape(this.#model.weight(`${path}.bias`), [-1]) as tf.Tensor1D } : {}),
      };
    };
    return sumDeltas([lora, segmentIa3Delta(ia3s, weightOf)]);
  }

  /** The shared base matmuls once for all items' tokens, each item's held LoRA on its own rows (segment-lora). */
  async forwardHeld(items: readonly BatchItem[]): Promise<Float32Array[]> {
    const out = tf.tidy(() => {
      const { loras, ia3s } = loraTensors(items);
      return this.#packedRun(items, this.#inputs(items), this.#heldDelta(loras, ia3s));
    });
    const hidden = items[0].shape[2];
    try {
      return splitFloat32((await out.data()) as Float32Array, items.map((it) => it.shape[0] * it.shape[1] * hidden));
    } finally {
      out.dispose();
    }
  }

  /** g_B of every item and the gradients of the held LoRA factors, recomputing the packed forward from h_B. */
  async backwardHeld(items: readonly BatchItem[]): Promise<PackedBackward> {
    const grads = tf.tidy(() => {
      const inputs = this.#inputs(items);
      const { loras, ia3s, factors } = loraTensors(items);
      const dy = tf.concat(items.map((it) => tf.tensor2d(it.g ?? new Float32Array(it.h.length), [it.shape[0] * it.shape[1], it.shape[2]])), 0);
      const xs = [...inputs, ...factors];
      const { grads } = gradients(() => this.#packedRun(items, inputs, this.#heldDelta(loras, ia3s)), xs, dy);
      return grads.map((g, k) => g ?? tf.zerosLike(xs[k]));
    });
    try {
      const data = await Promise.all(grads.map(async (g) => (await g.data()) as Float32Array));
      const gs = data.slice(0, items.length);
      let at = items.length;
      const loraGrads = items.map((it) => {
        if (it.lora === undefined) return undefined;
        const n = it.lora.modules.length * 2 + (it.lora.ia3?.length ?? 0);
        const part = data.slice(at, at + n);
        at += n;
        return part;
      });
      return { gs, loraGrads };
    } finally {
      tf.dispose(grads);
    }
  }

  async backwardPacked(items: readonly BatchItem[]): Promise<Float32Array[]> {
    const grads = tf.tidy(() => {
      const inputs = this.#inputs(items);
      const dy = tf.concat(items.map((it) => tf.tensor2d(it.g ?? new Float32Array(it.h.length), [it.shape[0] * it.shape[1], it.shape[2]])), 0);
      const { grads } = gradients(() => this.#packedRun(items, inputs), inputs, dy);
      return grads.map((g, k) => g ?? tf.zerosLike(inputs[k]));
    });
    try {
      return await Promise.all(grads.map(async (g) => (await g.data()) as Float32Array));
    } finally {
      tf.dispose(grads);
    }
  }

  /** h_B [batch, seq, hidden] → h_M. */
  async forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array> {
    const out = tf.tidy(() => this.#model.blocks(tf.tensor3d(h, shape), range.start, range.end));
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }

  /** h_B → h_M, keeping the forward's tape so that backwardFromTape needs no recomputation. */
  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: TapedForward }> {
    const input = tf.tensor3d(h, shape);
    let tape: TapedForward;
    try {
      tape = tapedForward(() => this.#model.blocks(input, range.start, range.end), [input]);
    } finally {
      input.dispose();
    }
    try {
      return { output: (await tape.output.data()) as Float32Array, tape };
    } catch (err) {
      tape.dispose();
      throw err;
    }
  }

  /** g_M → g_B from a kept tape (which this frees). */
  async backwardFromTape(tape: TapedForward | PackedTape, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    if ('rows' in tape) return (await this.backwardPackedFromTape(tape, [g]))[0];
    const dy = tf.tensor3d(g, shape);
    let out: tf.Tensor;
    try {
      [out] = tape.vjp(dy);
    } finally {
      dy.dispose();
    }
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }

  /** g_M (same shape as h_B) → g_B. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    const out = tf.tidy(() => {
      const x = tf.tensor3d(h, shape);
      const { grads } = gradients(() => this.#model.blocks(x, range.start, range.end), [x], tf.tensor3d(g, shape));
      return grads[0] ?? tf.zerosLike(x);
    });
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }
}
