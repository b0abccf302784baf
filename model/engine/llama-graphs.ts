// ONNX graphs of the LLaMA-family backbone, built from the model configuration: the forward
// of a block range or of the whole model, a forward that also outputs what backward needs,
// the hand-derived backward (vector-Jacobian product with respect to the hidden states), the
// training graphs with LoRA (the whole model, the top with its loss, the bottom's backward),
// the forward recomputed inside the VJP's graph, and a block range whose segments (sessions
// stacked along the batch) each carry their own LoRA or (IA)^3 (the cloud's held adapters).
//
// Hidden states travel as rows [tokens, hidden] so every projection is one Gemm against the
// weight in PyTorch's [out, in] layout (transB), and backward is a plain MatMul with the same
// weight: each weight is held once per session. Attention stacks the query heads that share a
// kv head along the sequence axis (as model/llama does), so one batched MatMul serves a group
// and the additive mask given as input is [group · seq, past + seq].
import type { ModelConfig } from '../config.ts';
import type { LinearModuleName } from '../hooks.ts';
import { GraphBuilder } from './graph.ts';
import type { OnnxGraph } from './onnx-proto.ts';
import { ONNX_FLOAT, ONNX_INT32 } from './onnx-proto.ts';

export type WeightArrays = ReadonlyMap<string, { shape: number[]; data: Float32Array }>;

/** LoRA on some projections of some layers: y = x W^T + scaling · (x A^T) B^T, A [r, in], B [out, r]. */
export interface LoraSpec {
  r: number;
  scaling: number;
  modules: readonly LinearModuleName[];
  /** Layers that carry LoRA; all when absent. */
  layers?: readonly number[];
}

/** Graph input names of one LoRA module's A and B. */
export const loraInputNames = (path: string): { a: string; b: string } => ({ a: `${path}.lora_A`, b: `${path}.lora_B` });
/** Graph output names of their gradients. */
export const loraGradNames = (path: string): { a: string; b: string } => ({ a: `grad.${path}.lora_A`, b: `grad.${path}.lora_B` });

/** Module paths carrying LoRA under a spec, in layer then module order. */
export function loraPaths(config: ModelConfig, spec: LoraSpec): string[] {
  const paths: string[] = [];
  const layers = spec.layers ?? Array.from({ length: config.numHiddenLayers }, (_, i) => i);
  for (const i of layers) for (const m of spec.modules) paths.push(modulePath(i, m));
  return paths;
}

export function modulePath(layer: number, name: LinearModuleName): string {
  const group = name === 'gate_proj' || name === 'up_proj' || name === 'down_proj' ? 'mlp' : 'self_attn';
  return `model.layers.${layer}.${group}.${name}`;
}

/** What a block's forward kept for its backward, by value name. */
interface BlockSaved {
  n1: string;
  r1: string;
  q: string;
  k: string;
  v: string;
  probs: string;
  merged: string;
  n2: string;
  r2: string;
  gate: string;
  up: string;
}
/**
 * What a kept forward exports for its VJP graph: all but the attention probabilities, which the
 * VJP recomputes from q and k (a batched matmul and a softmax, ~2% of a block's forward FLOPs at
 * 128 tokens). They are [heads, seq] per token: 15% of the rest's bytes at 4 x 128 on the 25M
 * shape and ~44% at SmolLM's 512 tokens, held on the cloud for every session between its Forward
 * and its Backward.
 */
const SAVED_FIELDS: Exclude<keyof BlockSaved, 'probs'>[] = ['n1', 'r1', 'q', 'k', 'v', 'merged', 'n2', 'r2', 'gate', 'up'];
export const savedName = (layer: number, field: string): string => `saved.${layer}.${field}`;
export const SAVED_PER_BLOCK = SAVED_FIELDS.length;

/** Per-graph shared values: the rope tables, the mask and [batch, seq] of the rows. */
interface Ctx {
  cos: string;
  sin: string;
  mask?: string;
  bs: string;
  lora?: { spec: LoraSpec; paths: Set<string> };
  /** Adapters held per segment of a stacked batch (segmentBlocksGraph). */
  segments?: SegmentCtx;
  /** KV cache: each block's past keys and values [batch, kvHeads, past, headDim] in, past + new out. */
  cache?: { past(layer: number): { k: string; v: string }; present(layer: number, k: string, v: string): void };
}

/**
 * Adapters of S segments of one stacked batch, each segment its own rows (its session's
 * batch): per LoRA path A [S, r, in] and B [S, out, r] with `lora_scale` [S, 1, 1], per
 * (IA)^3 path its scale [S, 1, n]. The base matmul runs once on every row; the adapters are
 * batched matmuls over the segment axis (Punica's idea).
 */
export interface SegmentAdapterSpec {
  /** LoRA paths; the rank is a dimension of the inputs (one graph serves every rank). */
  lora?: { paths: readonly string[] };
  /** `feedforward`: the scale multiplies the module's input (PEFT's down_proj), else its output. */
  ia3?: readonly { path: string; feedforward: boolean }[];
}

/** Graph input name of the segments' LoRA scales (lora_alpha / r each), [S, 1, 1]. */
export const SEGMENT_LORA_SCALE = 'lora_scale';
/** Graph input and gradient output names of one (IA)^3 path's stacked scales. */
export const ia3InputName = (path: string): string => `${path}.ia3_l`;
export const ia3GradName = (path: string): string => `grad.${path}.ia3_l`;

interface SegmentCtx {
  /** int64 [1]: S, the leading axis of every adapter input. */
  count: string;
  lora: Set<string>;
  /** (IA)^3 path → feedforward. */
  ia3: Map<string, boolean>;
}

class LlamaGraph {
  readonly g: GraphBuilder;
  private readonly dimsCache = new Map<string, string>();
  private readonly held = new Set<string>();
  private readonly segmentShapes = new Map<number, string>();
  /** An output-scaled (IA)^3 module's base output in this graph's forward, for its backward. */
  private readonly ia3Base = new Map<string, string>();

  constructor(
    readonly config: ModelConfig,
    private readonly weights: WeightArrays,
    name: string,
  ) {
    this.g = new GraphBuilder(name);
  }

  /** A weight by Hugging Face name, added as an initializer on first use. */
  w(name: string): string {
    if (!this.held.has(name)) {
      const a = this.weights.get(name);
      if (!a) throw new Error(`weight ${name} is missing`);
      this.g.weight(name, a.data, a.shape);
      this.held.add(name);
    }
    return name;
  }

  has(name: string): boolean {
    return this.weights.has(name);
  }

  /** [batch, seq, ...rest] as an int64 shape tensor. */
  dims(ctx: Ctx, rest: number[]): string {
    const key = rest.join(',');
    let v = this.dimsCache.get(key);
    if (!v) {
      v = this.g.op('Concat', [ctx.bs, this.g.ints(rest)], { axis: 0 });
      this.dimsCache.set(key, v);
    }
    return v;
  }

  rmsNorm(x: string, weight: string): { out: string; n: string; r: string } {
    const g = this.g;
    const ms = g.meanKeep(g.mul(x, x), [-1]);
    const r = g.op('Reciprocal', [g.op('Sqrt', [g.add(ms, g.scalar(this.config.rmsNormEps))])]);
    const n = g.mul(x, r);
    return { out: g.mul(n, this.w(weight)), n, r };
  }

  /** d x for RMSNorm given dy, the normalised n and 1/rms r. */
  rmsNormBackward(dy: string, weight: string, n: string, r: string): string {
    const g = this.g;
    const dn = g.mul(dy, this.w(weight));
    return g.mul(r, g.sub(dn, g.mul(n, g.meanKeep(g.mul(dn, n), [-1]))));
  }

  /** x cos + rotate_half(x) sin over the last axis (the tables broadcast over the leading axes). */
  rope(x: string, ctx: Ctx): string {
    const g = this.g;
    const [x1, x2] = g.node('Split', [x], { axis: -1 }, 2);
    const rotated = g.op('Concat', [g.op('Neg', [x2]), x1], { axis: -1 });
    return g.add(g.mul(x, ctx.cos), g.mul(rotated, ctx.sin));
  }

  /** The transpose of rope: dy cos + rotate_half^T(dy sin), rotate_half^T([z1, z2]) = [z2, -z1]. */
  ropeBackward(dy: string, ctx: Ctx): string {
    const g = this.g;
    const [z1, z2] = g.node('Split', [g.mul(dy, ctx.sin)], { axis: -1 }, 2);
    return g.add(g.mul(dy, ctx.cos), g.op('Concat', [z2, g.op('Neg', [z1])], { axis: -1 }));
  }

  private lora(path: string, ctx: Ctx): { a: string; b: string } | undefined {
    if (!ctx.lora?.paths.has(path)) return undefined;
    return loraInputNames(path);
  }

  /** [out, in] of a module's weight. */
  private shapeOf(path: string): [number, number] {
    const w = this.weights.get(`${path}.weight`);
    if (!w) throw new Error(`weight ${path}.weight is missing`);
    return [w.shape[0], w.shape[1]];
  }

  /** Rows x [S · n', n] as [S, n', n]: each segment's rows on its own. */
  private bySegment(x: string, n: number, seg: SegmentCtx): string {
    let shape = this.segmentShapes.get(n);
    if (!shape) {
      shape = this.g.op('Concat', [seg.count, this.g.ints([-1, n])], { axis: 0 });
      this.segmentShapes.set(n, shape);
    }
    return this.g.op('Reshape', [x, shape]);
  }

  /** y = x W^T + b (+ LoRA, or a segment's LoRA or (IA)^3) on rows. */
  linear(layer: number, name: LinearModuleName, x: string, ctx: Ctx): string {
    const g = this.g;
    const path = modulePath(layer, name);
    const bias = `${path}.bias`;
    const seg = ctx.segments;
    const feedforward = seg?.ia3.get(path);
    const [out, inF] = this.shapeOf(path);
    // (IA)^3 on the input: each segment's rows times its scale, then the base.
    const xin = seg && feedforward === true ? g.reshape(g.mul(this.bySegment(x, inF, seg), ia3InputName(path)), [-1, inF]) : x;
    const inputs = [xin, this.w(`${path}.weight`)];
    if (this.has(bias)) inputs.push(this.w(bias));
    const y = g.op('Gemm', inputs, { transB: 1 });
    if (seg && feedforward === false) {
      this.ia3Base.set(path, y);
      return g.reshape(g.mul(this.bySegment(y, out, seg), ia3InputName(path)), [-1, out]);
    }
    if (seg?.lora.has(path)) {
      const names = loraInputNames(path);
      const u = g.matmul(this.bySegment(x, inF, seg), g.transpose(names.a, [0, 2, 1])); // [S, n', r]
      const d = g.mul(g.matmul(u, g.transpose(names.b, [0, 2, 1])), SEGMENT_LORA_SCALE); // [S, n', out]
      return g.add(y, g.reshape(d, [-1, out]));
    }
    const lora = this.lora(path, ctx);
    if (!lora) return y;
    const u = g.op('Gemm', [x, lora.a], { transB: 1 });
    return g.op('Gemm', [u, lora.b, y], { transB: 1, alpha: { float: ctx.lora?.spec.scaling ?? 1 } });
  }

  /** d x of a linear for dy (rows); the gradients of its LoRA or (IA)^3 become graph outputs. */
  linearBackward(layer: number, name: LinearModuleName, dy: string, x: string, ctx: Ctx): string {
    const g = this.g;
    const path = modulePath(layer, name);
    const weight = this.w(`${path}.weight`);
    const seg = ctx.segments;
    const feedforward = seg?.ia3.get(path);
    if (seg && feedforward !== undefined) {
      const [out, inF] = this.shapeOf(path);
      const scale = ia3InputName(path);
      if (feedforward) {
        // y = (x · l) W^T: d(x · l) = dy W, dl = Σ_rows x · d(x · l), dx = d(x · l) · l.
        const dxl = this.bySegment(g.matmul(dy, weight), inF, seg);
        g.alias(g.sumKeep(g.mul(this.bySegment(x, inF, seg), dxl), [1]), ia3GradName(path));
        return g.reshape(g.mul(dxl, scale), [-1, inF]);
      }
      // y = base · l: dl = Σ_rows dy · base, d base = dy · l.
      // Its forward is in this graph (blocksRecomputeBackwardGraph): the base output it computed.
      const base = this.ia3Base.get(path);
      if (base === undefined) throw new Error(`the (IA)^3 backward of ${path} needs its forward in the same graph`);
      const dy3 = this.bySegment(dy, out, seg);
      g.alias(g.sumKeep(g.mul(dy3, this.bySegment(base, out, seg)), [1]), ia3GradName(path));
      return g.matmul(g.reshape(g.mul(dy3, scale), [-1, out]), weight);
    }
    const dx = g.matmul(dy, weight);
    if (seg?.lora.has(path)) {
      const [out, inF] = this.shapeOf(path);
      const names = loraInputNames(path);
      const grads = loraGradNames(path);
      const x3 = this.bySegment(x, inF, seg);
      const dy3 = this.bySegment(dy, out, seg);
      const u = g.matmul(x3, g.transpose(names.a, [0, 2, 1])); // [S, n', r]
      g.alias(g.mul(g.matmul(g.transpose(dy3, [0, 2, 1]), u), SEGMENT_LORA_SCALE), grads.b); // [S, out, r]
      const du = g.mul(g.matmul(dy3, names.b), SEGMENT_LORA_SCALE); // [S, n', r]
      g.alias(g.matmul(g.transpose(du, [0, 2, 1]), x3), grads.a); // [S, r, in]
      return g.add(dx, g.reshape(g.matmul(du, names.a), [-1, inF]));
    }
    const lora = this.lora(path, ctx);
    if (!lora) return dx;
    const s = ctx.lora?.spec.scaling ?? 1;
    const u = g.op('Gemm', [x, lora.a], { transB: 1 });
    const grads = loraGradNames(path);
    g.alias(g.op('Gemm', [dy, u], { transA: 1, alpha: { float: s } }), grads.b);
    const du = g.op('Gemm', [dy, lora.b], { alpha: { float: s } });
    g.alias(g.op('Gemm', [du, x], { transA: 1 }), grads.a);
    return g.add(dx, g.matmul(du, lora.a));
  }

  /** softmax(q kᵀ / √hd + mask) of rope'd q [B, nKv, g·S, hd] and k [B, nKv, T, hd]. */
  attentionProbs(q: string, k: string, ctx: Ctx): string {
    const g = this.g;
    const scores = g.matmul(q, g.transpose(k, [0, 1, 3, 2]));
    const logits = g.add(g.mul(scores, g.scalar(1 / Math.sqrt(this.config.headDim))), ctx.mask as string);
    return g.op('Softmax', [logits], { axis: -1 });
  }

  /** One block on rows x [tokens, hidden]; returns its output and what backward needs. */
  block(i: number, x: string, ctx: Ctx): { y: string; saved: BlockSaved } {
    const g = this.g;
    const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd } = this.config;
    const grp = nH / nKv;
    const p = `model.layers.${i}`;
    const norm1 = this.rmsNorm(x, `${p}.input_layernorm.weight`);
    const qRows = this.linear(i, 'q_proj', norm1.out, ctx);
    const kRows = this.linear(i, 'k_proj', norm1.out, ctx);
    const vRows = this.linear(i, 'v_proj', norm1.out, ctx);
    // [B, S, nKv, g, hd] → [B, nKv, g, S, hd]: the rope tables [S, hd] broadcast; then stacked [B, nKv, g·S, hd].
    const q5 = g.transpose(g.op('Reshape', [qRows, this.dims(ctx, [nKv, grp, hd])]), [0, 2, 3, 1, 4]);
    const q = g.reshape(this.rope(q5, ctx), [0, 0, -1, hd]);
    let k = this.rope(g.transpose(g.op('Reshape', [kRows, this.dims(ctx, [nKv, hd])]), [0, 2, 1, 3]), ctx);
    let v = g.transpose(g.op('Reshape', [vRows, this.dims(ctx, [nKv, hd])]), [0, 2, 1, 3]);
    if (ctx.cache) {
      const past = ctx.cache.past(i);
      k = g.op('Concat', [past.k, k], { axis: 2 });
      v = g.op('Concat', [past.v, v], { axis: 2 });
      ctx.cache.present(i, k, v);
    }
    const probs = this.attentionProbs(q, k, ctx);
    const ctx4 = g.matmul(probs, v); // [B, nKv, g·S, hd]
    const merged = g.reshape(g.transpose(g.reshape(ctx4, [0, 0, grp, -1, hd]), [0, 3, 1, 2, 4]), [-1, nH * hd]);
    const attn = this.linear(i, 'o_proj', merged, ctx);
    const h = g.add(x, attn);
    const norm2 = this.rmsNorm(h, `${p}.post_attention_layernorm.weight`);
    const gate = this.linear(i, 'gate_proj', norm2.out, ctx);
    const up = this.linear(i, 'up_proj', norm2.out, ctx);
    const act = g.mul(g.mul(gate, g.op('Sigmoid', [gate])), up);
    const y = g.add(h, this.linear(i, 'down_proj', act, ctx));
    return { y, saved: { n1: norm1.n, r1: norm1.r, q, k, v, probs, merged, n2: norm2.n, r2: norm2.r, gate, up } };
  }

  /** The vector-Jacobian product of block i: dy (rows) → dx (rows). */
  blockBackward(i: number, dy: string, s: BlockSaved, ctx: Ctx): string {
    const g = this.g;
    const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd } = this.config;
    const grp = nH / nKv;
    const p = `model.layers.${i}`;
    const w1 = `${p}.input_layernorm.weight`;
    const w2 = `${p}.post_attention_layernorm.weight`;
    // The norms' outputs, needed as the inputs of LoRA'd projections.
    const lora = ctx.lora !== undefined || (ctx.segments !== undefined && ctx.segments.lora.size > 0);
    const norm1 = lora ? g.mul(s.n1, this.w(w1)) : '';
    const norm2 = lora ? g.mul(s.n2, this.w(w2)) : '';
    // MLP: y = h + down(silu(gate) · up).
    const sg = g.op('Sigmoid', [s.gate]);
    const silu = g.mul(s.gate, sg);
    const act = g.mul(silu, s.up);
    const dAct = this.linearBackward(i, 'down_proj', dy, act, ctx);
    // d silu / d gate = s (1 + gate − silu)
    const dSilu = g.mul(sg, g.sub(g.add(s.gate, g.scalar(1)), silu));
    const dGate = g.mul(g.mul(dAct, s.up), dSilu);
    const dUp = g.mul(dAct, silu);
    const dNorm2 = g.add(this.linearBackward(i, 'gate_proj', dGate, norm2, ctx), this.linearBackward(i, 'up_proj', dUp, norm2, ctx));
    const dh = g.add(dy, this.rmsNormBackward(dNorm2, w2, s.n2, s.r2));
    // Attention.
    const dMerged = this.linearBackward(i, 'o_proj', dh, s.merged, ctx);
    const dCtx = g.reshape(g.transpose(g.op('Reshape', [dMerged, this.dims(ctx, [nKv, grp, hd])]), [0, 2, 3, 1, 4]), [0, 0, -1, hd]);
    const dProbs = g.matmul(dCtx, g.transpose(s.v, [0, 1, 3, 2]));
    const dV = g.matmul(g.transpose(s.probs, [0, 1, 3, 2]), dCtx);
    const dScores = g.mul(g.mul(s.probs, g.sub(dProbs, g.sumKeep(g.mul(dProbs, s.probs), [-1]))), g.scalar(1 / Math.sqrt(hd)));
    const dQ = g.matmul(dScores, s.k);
    const dK = g.matmul(g.transpose(dScores, [0, 1, 3, 2]), s.q);
    const dQRows = g.reshape(g.transpose(this.ropeBackward(g.reshape(dQ, [0, 0, grp, -1, hd]), ctx), [0, 3, 1, 2, 4]), [-1, nH * hd]);
    const dKRows = g.reshape(g.transpose(this.ropeBackward(dK, ctx), [0, 2, 1, 3]), [-1, nKv * hd]);
    const dVRows = g.reshape(g.transpose(dV, [0, 2, 1, 3]), [-1, nKv * hd]);
    const dNorm1 = g.add(
      g.add(this.linearBackward(i, 'q_proj', dQRows, norm1, ctx), this.linearBackward(i, 'k_proj', dKRows, norm1, ctx)),
      this.linearBackward(i, 'v_proj', dVRows, norm1, ctx),
    );
    return g.add(dh, this.rmsNormBackward(dNorm1, w1, s.n1, s.r1));
  }

  /** Blocks [start, end) on rows x; with `keep`, each block's saved tensors become outputs. */
  blocksOutputtingSaved(x: string, start: number, end: number, ctx: Ctx, keep: boolean): string {
    for (let i = start; i < end; i++) {
      const { y, saved } = this.block(i, x, ctx);
      if (keep) {
        for (const f of SAVED_FIELDS) {
          this.g.alias(saved[f], savedName(i, f));
          this.g.output(savedName(i, f), ONNX_FLOAT);
        }
      }
      x = y;
    }
    return x;
  }

  /** The VJP of blocks [start, end) for dy (rows), from the saved tensors given as inputs (the attention probabilities recomputed; `ctx` has the mask). */
  blocksBackwardFromSaved(dy: string, start: number, end: number, ctx: Ctx): string {
    let d = dy;
    for (let i = end - 1; i >= start; i--) {
      const saved = {} as BlockSaved;
      for (const f of SAVED_FIELDS) saved[f] = this.g.input(savedName(i, f), ONNX_FLOAT);
      saved.probs = this.attentionProbs(saved.q, saved.k, ctx);
      d = this.blockBackward(i, d, saved, ctx);
    }
    return d;
  }

  headWeight(): string {
    return this.w(this.config.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight');
  }

  /** Rope tables [seq, headDim] and the additive mask [group · seq, past + seq] as graph inputs. */
  ropeAndMask(withMask: boolean): { cos: string; sin: string; mask?: string } {
    const g = this.g;
    const hd = this.config.headDim;
    const cos = g.input('cos', ONNX_FLOAT, ['seq', hd]);
    const sin = g.input('sin', ONNX_FLOAT, ['seq', hd]);
    const mask = withMask ? g.input('mask', ONNX_FLOAT, ['group_seq', 'total']) : undefined;
    return { cos, sin, mask };
  }

  /** Rows of h [batch, seq, hidden] and the [batch, seq] shape. */
  hiddenInput(name: string): { rows: string; bs: string } {
    const g = this.g;
    const h = g.input(name, ONNX_FLOAT, ['batch', 'seq', this.config.hiddenSize]);
    return { rows: g.reshape(h, [-1, this.config.hiddenSize]), bs: g.op('Shape', [h], { end: 2 }) };
  }

  embed(ids: string): { rows: string; bs: string } {
    const g = this.g;
    return { rows: g.reshape(g.op('Gather', [this.w('model.embed_tokens.weight'), ids]), [-1, this.config.hiddenSize]), bs: g.op('Shape', [ids]) };
  }

  outputHidden(rows: string, ctx: Ctx, name: string): void {
    this.g.alias(this.g.op('Reshape', [rows, this.dims(ctx, [this.config.hiddenSize])]), name);
    this.g.output(name, ONNX_FLOAT, ['batch', 'seq', this.config.hiddenSize]);
  }
}

function checkRange(config: ModelConfig, start: number, end: number): void {
  if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end > config.numHiddenLayers || start >= end) {
    throw new Error(`block range [${start}, ${end}) is outside [0, ${config.numHiddenLayers}] or empty`);
  }
}

/**
 * Blocks [start, end) on hidden states: inputs h [batch, seq, hidden], cos, sin, mask; output
 * `out`. With `keep`, also every block's saved tensors (savedName(i, field)) for blockRangeBackward.
 */
export function blockRangeGraph(config: ModelConfig, weights: WeightArrays, start: number, end: number, keep: boolean): OnnxGraph {
  checkRange(config, start, end);
  const m = new LlamaGraph(config, weights, `blocks_${start}_${end}${keep ? '_keep' : ''}`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('h');
  const ctx: Ctx = { cos, sin, mask, bs };
  m.outputHidden(m.blocksOutputtingSaved(rows, start, end, ctx, keep), ctx, 'out');
  return m.g.build();
}

/** The VJP of blocks [start, end): inputs dy [batch, seq, hidden], cos, sin, mask and the saved tensors; output `dx`. */
export function blockRangeBackwardGraph(config: ModelConfig, weights: WeightArrays, start: number, end: number): OnnxGraph {
  checkRange(config, start, end);
  const m = new LlamaGraph(config, weights, `blocks_${start}_${end}_backward`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('dy');
  const ctx: Ctx = { cos, sin, mask, bs };
  m.outputHidden(m.blocksBackwardFromSaved(rows, start, end, ctx), ctx, 'dx');
  return m.g.build();
}

/** Declares the segments' adapter inputs (and, with `grads`, their gradients as outputs). */
function segmentIo(m: LlamaGraph, weights: WeightArrays, spec: SegmentAdapterSpec, grads: boolean): SegmentCtx {
  const g = m.g;
  const lora = spec.lora?.paths ?? [];
  const ia3 = spec.ia3 ?? [];
  if (lora.length + ia3.length === 0) throw new Error('a segment adapter spec names no module');
  const shapeOf = (path: string): number[] => {
    const w = weights.get(`${path}.weight`);
    if (!w) throw new Error(`weight ${path}.weight is missing`);
    return w.shape;
  };
  for (const path of lora) {
    const [out, inF] = shapeOf(path);
    const r = 'rank';
    const names = loraInputNames(path);
    g.input(names.a, ONNX_FLOAT, ['segments', r, inF]);
    g.input(names.b, ONNX_FLOAT, ['segments', out, r]);
    if (!grads) continue;
    const gn = loraGradNames(path);
    g.output(gn.a, ONNX_FLOAT, ['segments', r, inF]);
    g.output(gn.b, ONNX_FLOAT, ['segments', out, r]);
  }
  if (lora.length > 0) g.input(SEGMENT_LORA_SCALE, ONNX_FLOAT, ['segments', 1, 1]);
  for (const { path, feedforward } of ia3) {
    if (lora.includes(path)) throw new Error(`${path} carries both LoRA and (IA)^3`);
    const [out, inF] = shapeOf(path);
    g.input(ia3InputName(path), ONNX_FLOAT, ['segments', 1, feedforward ? inF : out]);
    if (grads) g.output(ia3GradName(path), ONNX_FLOAT, ['segments', 1, feedforward ? inF : out]);
  }
  const first = lora.length > 0 ? SEGMENT_LORA_SCALE : ia3InputName(ia3[0].path);
  return { count: g.op('Shape', [first], { end: 1 }), lora: new Set(lora), ia3: new Map(ia3.map((x) => [x.path, x.feedforward])) };
}

/**
 * Blocks [start, end) of a stacked batch whose segments each hold their own adapter: inputs h
 * [S · batch', seq, hidden], cos, sin, mask and the adapters (SegmentAdapterSpec); output `out`.
 */
export function segmentBlocksGraph(config: ModelConfig, weights: WeightArrays, spec: SegmentAdapterSpec, start: number, end: number): OnnxGraph {
  checkRange(config, start, end);
  const m = new LlamaGraph(config, weights, `segment_blocks_${start}_${end}`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('h');
  const ctx: Ctx = { cos, sin, mask, bs, segments: segmentIo(m, weights, spec, false) };
  m.outputHidden(m.blocksOutputtingSaved(rows, start, end, ctx, false), ctx, 'out');
  return m.g.build();
}

/**
 * The VJP of blocks [start, end) recomputed from their input, in one graph: inputs h and dy
 * [batch, seq, hidden], cos, sin, mask (and the segments' adapters when `spec` is given);
 * outputs `dx` (and every adapter input's gradient). What the forward keeps never leaves
 * ONNX Runtime: the cloud's backward after an eviction or a restart, and of held adapters.
 */
export function blocksRecomputeBackwardGraph(config: ModelConfig, weights: WeightArrays, spec: SegmentAdapterSpec | undefined, start: number, end: number): OnnxGraph {
  checkRange(config, start, end);
  const m = new LlamaGraph(config, weights, `blocks_${start}_${end}_recompute_backward${spec ? '_segments' : ''}`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('h');
  const dy = m.g.reshape(m.g.input('dy', ONNX_FLOAT, ['batch', 'seq', config.hiddenSize]), [-1, config.hiddenSize]);
  const ctx: Ctx = { cos, sin, mask, bs, ...(spec ? { segments: segmentIo(m, weights, spec, true) } : {}) };
  const saved: BlockSaved[] = [];
  let x = rows;
  for (let i = start; i < end; i++) {
    const b = m.block(i, x, ctx);
    saved.push(b.saved);
    x = b.y;
  }
  let d = dy;
  for (let i = end - 1; i >= start; i--) d = m.blockBackward(i, d, saved[i - start], ctx);
  m.outputHidden(d, ctx, 'dx');
  return m.g.build();
}

/** The whole model: input ids int32 [batch, seq], cos, sin, mask → logits [batch, seq, vocab]. */
export function logitsGraph(config: ModelConfig, weights: WeightArrays): OnnxGraph {
  const m = new LlamaGraph(config, weights, 'logits');
  const g = m.g;
  const { cos, sin, mask } = m.ropeAndMask(true);
  const ids = g.input('input_ids', ONNX_INT32, ['batch', 'seq']);
  const { rows, bs } = m.embed(ids);
  const ctx: Ctx = { cos, sin, mask, bs };
  let x = rows;
  for (let i = 0; i < config.numHiddenLayers; i++) x = m.block(i, x, ctx).y;
  const n = m.rmsNorm(x, 'model.norm.weight').out;
  const logits = g.op('Gemm', [n, m.headWeight()], { transB: 1 });
  g.alias(g.op('Reshape', [logits, m.dims(ctx, [config.vocabSize])]), 'logits');
  g.output('logits', ONNX_FLOAT, ['batch', 'seq', config.vocabSize]);
  return g.build();
}

/** The LoRA module paths of `spec` whose layer is in [start, end). */
function segmentPaths(config: ModelConfig, spec: LoraSpec | undefined, start: number, end: number): string[] {
  if (!spec) return [];
  return loraPaths(config, spec).filter((p) => {
    const layer = Number(p.split('.')[2]);
    return layer >= start && layer < end;
  });
}

/** Declares every path's lora_A and lora_B inputs (and, with `grads`, their gradients as outputs). */
function loraIo(m: LlamaGraph, weights: WeightArrays, spec: LoraSpec | undefined, paths: readonly string[], grads: boolean): Ctx['lora'] {
  if (!spec || paths.length === 0) return undefined;
  for (const path of paths) {
    const w = weights.get(`${path}.weight`);
    if (!w) throw new Error(`weight ${path}.weight is missing`);
    const names = loraInputNames(path);
    m.g.input(names.a, ONNX_FLOAT, [spec.r, w.shape[1]]);
    m.g.input(names.b, ONNX_FLOAT, [w.shape[0], spec.r]);
    if (!grads) continue;
    const g = loraGradNames(path);
    m.g.output(g.a, ONNX_FLOAT, [spec.r, w.shape[1]]);
    m.g.output(g.b, ONNX_FLOAT, [w.shape[0], spec.r]);
  }
  return { spec, paths: new Set(paths) };
}

/** What the top of a training graph starts from: token ids (the whole model) or hidden states at block `start`. */
export type TopInput = { from: 'ids' } | { from: 'hidden'; start: number };

/**
 * One training step's compute from `input` to the loss: inputs input_ids int32 [batch, seq]
 * (or h [batch, seq, hidden]), targets int32 [tokens] (the label each position predicts, any
 * valid id where ignored), weights float [tokens] (each counted token's weight in the loss, 0
 * where ignored), cos, sin, mask and the lora_A and lora_B of every LoRA path in the blocks run;
 * outputs `loss` (the weighted cross-entropy sum), the gradient of every A and B there and,
 * with `withDh` (hidden input only), `dh` = dL/dh.
 */
export function topTrainGraph(config: ModelConfig, weights: WeightArrays, spec: LoraSpec | undefined, input: TopInput, withDh: boolean): OnnxGraph {
  const start = input.from === 'ids' ? 0 : input.start;
  if (input.from === 'hidden' && start < config.numHiddenLayers) checkRange(config, start, config.numHiddenLayers);
  const m = new LlamaGraph(config, weights, `top_train_${input.from}_${start}`);
  const g = m.g;
  const { cos, sin, mask } = m.ropeAndMask(true);
  const x0 = input.from === 'ids' ? m.embed(g.input('input_ids', ONNX_INT32, ['batch', 'seq'])) : m.hiddenInput('h');
  const targets = g.input('targets', ONNX_INT32, ['tokens']);
  const tokenWeights = g.input('weights', ONNX_FLOAT, ['tokens']);
  const lora = loraIo(m, weights, spec, segmentPaths(config, spec, start, config.numHiddenLayers), true);
  const ctx: Ctx = { cos, sin, mask, bs: x0.bs, lora };
  let x = x0.rows;
  const saved: BlockSaved[] = [];
  for (let i = start; i < config.numHiddenLayers; i++) {
    const b = m.block(i, x, ctx);
    saved.push(b.saved);
    x = b.y;
  }
  const norm = m.rmsNorm(x, 'model.norm.weight');
  const logits = g.op('Gemm', [norm.out, m.headWeight()], { transB: 1 }); // [tokens, vocab]
  // Cross-entropy with the log-sum-exp trick; d logits = (softmax − onehot) · weight.
  const mx = g.op('ReduceMax', [logits], { axes: [-1], keepdims: 1 });
  const e = g.op('Exp', [g.sub(logits, mx)]);
  const se = g.sumKeep(e, [-1]);
  const lse = g.add(g.op('Log', [se]), mx);
  const idx = g.op('Unsqueeze', [targets, g.ints([1])]);
  const picked = g.op('GatherElements', [logits, idx], { axis: 1 });
  const w1 = g.op('Unsqueeze', [tokenWeights, g.ints([1])]);
  g.alias(g.sum(g.mul(w1, g.sub(lse, picked)), [0, 1]), 'loss');
  g.output('loss', ONNX_FLOAT, []);
  const pw = g.mul(g.op('Div', [e, se]), w1);
  const dLogits = g.op('ScatterElements', [pw, idx, g.sub(g.op('GatherElements', [pw, idx], { axis: 1 }), w1)], { axis: 1 });
  let d = m.rmsNormBackward(g.matmul(dLogits, m.headWeight()), 'model.norm.weight', norm.n, norm.r);
  for (let i = config.numHiddenLayers - 1; i >= start; i--) d = m.blockBackward(i, d, saved[i - start], ctx);
  if (withDh && input.from === 'hidden') m.outputHidden(d, ctx, 'dh');
  return g.build();
}

/** The whole-model LoRA step: topTrainGraph from the token ids, gradients to every LoRA parameter. */
export function loraTrainGraph(config: ModelConfig, weights: WeightArrays, spec: LoraSpec): OnnxGraph {
  return topTrainGraph(config, weights, spec, { from: 'ids' }, false);
}

/** Hidden states at block `start` (h [batch, seq, hidden], cos, sin, mask, LoRA of the blocks run) → logits [batch, seq, vocab]. */
export function topLogitsGraph(config: ModelConfig, weights: WeightArrays, spec: LoraSpec | undefined, start: number): OnnxGraph {
  const m = new LlamaGraph(config, weights, `top_logits_${start}`);
  const g = m.g;
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('h');
  const lora = loraIo(m, weights, spec, segmentPaths(config, spec, start, config.numHiddenLayers), false);
  const ctx: Ctx = { cos, sin, mask, bs, lora };
  let x = rows;
  for (let i = start; i < config.numHiddenLayers; i++) x = m.block(i, x, ctx).y;
  const n = m.rmsNorm(x, 'model.norm.weight').out;
  g.alias(g.op('Reshape', [g.op('Gemm', [n, m.headWeight()], { transB: 1 }), m.dims(ctx, [config.vocabSize])]), 'logits');
  g.output('logits', ONNX_FLOAT, ['batch', 'seq', config.vocabSize]);
  return g.build();
}

/**
 * The bottom: input_ids int32 [batch, seq] (with cos, sin, mask and the LoRA of blocks
 * [0, end)) → embedding and blocks [0, end) → `out` [batch, seq, hidden]; with `keep`, also
 * every block's saved tensors for bottomBackwardGraph.
 */
export function bottomGraph(config: ModelConfig, weights: WeightArrays, spec: LoraSpec | undefined, end: number, keep: boolean): OnnxGraph {
  if (end > 0) checkRange(config, 0, end);
  const m = new LlamaGraph(config, weights, `bottom_${end}${keep ? '_keep' : ''}`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.embed(m.g.input('input_ids', ONNX_INT32, ['batch', 'seq']));
  const lora = loraIo(m, weights, spec, segmentPaths(config, spec, 0, end), false);
  const ctx: Ctx = { cos, sin, mask, bs, lora };
  m.outputHidden(m.blocksOutputtingSaved(rows, 0, end, ctx, keep), ctx, 'out');
  return m.g.build();
}

/** The bottom's backward to its LoRA parameters: dy [batch, seq, hidden], cos, sin, mask, the saved tensors and the LoRA inputs → their gradients. */
export function bottomBackwardGraph(config: ModelConfig, weights: WeightArrays, spec: LoraSpec, end: number): OnnxGraph {
  checkRange(config, 0, end);
  const m = new LlamaGraph(config, weights, `bottom_${end}_backward`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('dy');
  const lora = loraIo(m, weights, spec, segmentPaths(config, spec, 0, end), true);
  const ctx: Ctx = { cos, sin, mask, bs, lora };
  m.blocksBackwardFromSaved(rows, 0, end, ctx);
  return m.g.build();
}

export const pastName = (layer: number, kv: 'k' | 'v'): string => `past.${layer}.${kv}`;
export const presentName = (layer: number, kv: 'k' | 'v'): string => `present.${layer}.${kv}`;

/**
 * The whole model with a KV cache: input ids [batch, seq] at positions past..past+seq-1 (the
 * rope tables and mask given for those), every block's past.i.k and past.i.v [batch, kvHeads,
 * past, headDim] → logits of the last position [batch, vocab] and present.i.k, present.i.v.
 */
/** The past keys and values of blocks [start, end) as inputs, the present ones (past and new) as outputs. */
function cacheInputs(m: LlamaGraph, start: number, end: number): NonNullable<Ctx['cache']> {
  const g = m.g;
  const { numKeyValueHeads: nKv, headDim: hd } = m.config;
  for (let i = start; i < end; i++) {
    for (const kv of ['k', 'v'] as const) {
      g.input(pastName(i, kv), ONNX_FLOAT, ['batch', nKv, 'past', hd]);
      g.output(presentName(i, kv), ONNX_FLOAT, ['batch', nKv, 'total', hd]);
    }
  }
  return {
    past: (i) => ({ k: pastName(i, 'k'), v: pastName(i, 'v') }),
    present: (i, k, v) => {
      g.alias(k, presentName(i, 'k'));
      g.alias(v, presentName(i, 'v'));
    },
  };
}

/**
 * Blocks [start, end) on h [batch, seq, hidden] after the positions their cache holds: inputs h,
 * cos, sin, mask and each block's past keys and values; outputs `out` and the present ones
 * (split inference's middle).
 */
export function cachedBlockRangeGraph(config: ModelConfig, weights: WeightArrays, start: number, end: number): OnnxGraph {
  checkRange(config, start, end);
  const m = new LlamaGraph(config, weights, `blocks_${start}_${end}_cached`);
  const { cos, sin, mask } = m.ropeAndMask(true);
  const { rows, bs } = m.hiddenInput('h');
  const ctx: Ctx = { cos, sin, mask, bs, cache: cacheInputs(m, start, end) };
  let x = rows;
  for (let i = start; i < end; i++) x = m.block(i, x, ctx).y;
  m.outputHidden(x, ctx, 'out');
  return m.g.build();
}

export function cachedLogitsGraph(config: ModelConfig, weights: WeightArrays): OnnxGraph {
  const m = new LlamaGraph(config, weights, 'logits_cached');
  const g = m.g;
  const { cos, sin, mask } = m.ropeAndMask(true);
  const ids = g.input('input_ids', ONNX_INT32, ['batch', 'seq']);
  const { hiddenSize: d } = config;
  const cache = cacheInputs(m, 0, config.numHiddenLayers);
  const { rows, bs } = m.embed(ids);
  const ctx: Ctx = { cos, sin, mask, bs, cache };
  let x = rows;
  for (let i = 0; i < config.numHiddenLayers; i++) x = m.block(i, x, ctx).y;
  // Only the last position's logits: [batch, seq, hidden] → [batch, hidden].
  const h3 = g.op('Reshape', [x, m.dims(ctx, [d])]);
  const last = g.op('Squeeze', [g.op('Slice', [h3, g.ints([-1]), g.ints([2 ** 62]), g.ints([1])]), g.ints([1])]);
  const n = m.rmsNorm(last, 'model.norm.weight').out;
  g.alias(g.op('Gemm', [n, m.headWeight()], { transB: 1 }), 'logits');
  g.output('logits', ONNX_FLOAT, ['batch', config.vocabSize]);
  return g.build();
}
