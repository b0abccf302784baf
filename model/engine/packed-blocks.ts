// The middle blocks of many sequences in one backbone pass, packed along the token axis
// without padding: the linear layers (and norms, MLP) run once on the rows of every
// sequence together, attention runs per group of sequences of one length, each sequence
// seeing only its own earlier tokens (block-diagonal causal), with rotary positions from 0
// in each. Sequences may run different block ranges (sessions with different cuts): block
// i runs on the rows of the segments whose range holds it. What one segment gets back is
// what LlamaModel.blocks gives it alone, up to float rounding (the same ops, more rows).
import { as1D, as2D, batchMatMul, linear, tf, transposeLast } from '../backend.ts';
import type { LinearModuleName } from '../hooks.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { maskedSoftmax, rmsNorm, rope, swiglu } from '../llama/ops.ts';
import { ropeInverseFrequencies, ropeTables } from '../llama/rope.ts';

const MASKED = -1e9;

/** One request's rows: `batch` sequences of `seq` tokens, through blocks [start, end). */
export interface PackedSegment {
  start: number;
  end: number;
  batch: number;
  seq: number;
}

/** Where a segment's rows lie in the rows a block runs on. */
export interface ActiveSegment {
  /** Index into the segments given to packedBlocks. */
  index: number;
  offset: number;
  rows: number;
}

/**
 * A per-segment addition to a linear layer (a segment's own low-rank part, Punica's idea):
 * given the block's input rows of all active segments, the delta to add to the shared base
 * output, or undefined for none. Runs once per linear layer for all segments.
 */
export type PackedLinearDelta = (layer: number, name: LinearModuleName, x: tf.Tensor2D, active: readonly ActiveSegment[]) => tf.Tensor2D | undefined;

/** The blocks of one held model on packed sequences; keeps rotary tables and masks per length. */
export class PackedBlocks {
  readonly #model: LlamaModel;
  readonly #invFreq: Float64Array;
  readonly #tables = new Map<number, { cos: tf.Tensor2D; sin: tf.Tensor2D; mask: tf.Tensor2D }>();

  constructor(model: LlamaModel) {
    this.#model = model;
    this.#invFreq = ropeInverseFrequencies(model.config);
  }

  /**
   * inputs[k]: segment k's rows [batch·seq, hidden]; returns each segment's output rows.
   * Differentiable (under tapedForward or gradients) with respect to every input.
   */
  run(inputs: readonly tf.Tensor2D[], segments: readonly PackedSegment[], delta?: PackedLinearDelta): tf.Tensor2D[] {
    if (inputs.length !== segments.length) throw new Error(`packedBlocks: ${inputs.length} inputs for ${segments.length} segments`);
    const current = [...inputs];
    const first = Math.min(...segments.map((s) => s.start));
    const last = Math.max(...segments.map((s) => s.end));
    for (let layer = first; layer < last; layer++) {
      // Segments of one length lie together, so that attention takes each group in one piece.
      const active = segments.map((s, index) => ({ s, index })).filter(({ s }) => s.start <= layer && layer < s.end).sort((a, b) => a.s.seq - b.s.seq || a.index - b.index);
      if (active.length === 0) continue;
      const placed: ActiveSegment[] = [];
      let offset = 0;
      for (const { s, index } of active) {
        placed.push({ index, offset, rows: s.batch * s.seq });
        offset += s.batch * s.seq;
      }
      const x = placed.length === 1 ? current[placed[0].index] : (tf.concat(placed.map((p) => current[p.index]), 0) as tf.Tensor2D);
      const y = tf.tidy(() => this.#block(layer, x, placed, segments, delta));
      if (placed.length === 1) current[placed[0].index] = y;
      else {
        const parts = tf.split(y, placed.map((p) => p.rows), 0) as tf.Tensor2D[];
        placed.forEach((p, k) => { current[p.index] = parts[k]; });
      }
    }
    return current;
  }

  dispose(): void {
    for (const t of this.#tables.values()) tf.dispose([t.cos, t.sin, t.mask]);
    this.#tables.clear();
  }

  #table(seq: number): { cos: tf.Tensor2D; sin: tf.Tensor2D; mask: tf.Tensor2D } {
    let t = this.#tables.get(seq);
    if (t === undefined) {
      const { cos, sin } = ropeTables(this.#invFreq, 0, seq);
      const d = this.#model.config.headDim;
      const groupSize = this.#model.config.numAttentionHeads / this.#model.config.numKeyValueHeads;
      const m = new Float32Array(seq * seq);
      for (let i = 0; i < seq; i++) for (let j = i + 1; j < seq; j++) m[i * seq + j] = MASKED;
      t = tf.tidy(() => {
        const causal = tf.tensor2d(m, [seq, seq]);
        return {
          cos: tf.keep(tf.tensor2d(cos, [seq, d])),
          sin: tf.keep(tf.tensor2d(sin, [seq, d])),
          mask: tf.keep(groupSize === 1 ? causal : (tf.tile(causal, [groupSize, 1]) as tf.Tensor2D)),
        };
      });
      if (this.#tables.size >= 64) {
        const [oldKey, old] = this.#tables.entries().next().value as [number, { cos: tf.Tensor2D; sin: tf.Tensor2D; mask: tf.Tensor2D }];
        tf.dispose([old.cos, old.sin, old.mask]);
        this.#tables.delete(oldKey);
      }
      this.#tables.set(seq, t);
    }
    return t;
  }

  #linear(layer: number, group: 'self_attn' | 'mlp', name: LinearModuleName, x: tf.Tensor2D, placed: readonly ActiveSegment[], delta?: PackedLinearDelta): tf.Tensor2D {
    const path = `model.layers.${layer}.${group}.${name}`;
    const weight = as2D(this.#model.weight(`${path}.weight`));
    const bias = as1D(this.#model.weights.get(`${path}.bias`));
    let y = linear(x, weight);
    if (bias) y = tf.add(y, bias) as tf.Tensor2D;
    const d = delta?.(layer, name, x, placed);
    return d === undefined ? y : (tf.add(y, d) as tf.Tensor2D);
  }

  #block(layer: number, x: tf.Tensor2D, placed: readonly ActiveSegment[], segments: readonly PackedSegment[], delta?: PackedLinearDelta): tf.Tensor2D {
    const m = this.#model;
    const eps = m.config.rmsNormEps;
    const p = `model.layers.${layer}`;
    const n1 = rmsNorm(x, m.weight(`${p}.input_layernorm.weight`), eps) as tf.Tensor2D;
    const attn = this.#attention(layer, n1, placed, segments, delta);
    const h = tf.add(x, attn) as tf.Tensor2D;
    const n2 = rmsNorm(h, m.weight(`${p}.post_attention_layernorm.weight`), eps) as tf.Tensor2D;
    const gate = this.#linear(layer, 'mlp', 'gate_proj', n2, placed, delta);
    const up = this.#linear(layer, 'mlp', 'up_proj', n2, placed, delta);
    const act = swiglu(gate, up) as tf.Tensor2D;
    return tf.add(h, this.#linear(layer, 'mlp', 'down_proj', act, placed, delta)) as tf.Tensor2D;
  }

  #attention(layer: number, x: tf.Tensor2D, placed: readonly ActiveSegment[], segments: readonly PackedSegment[], delta?: PackedLinearDelta): tf.Tensor2D {
    const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd } = this.#model.config;
    const q = this.#linear(layer, 'self_attn', 'q_proj', x, placed, delta);
    const k = this.#linear(layer, 'self_attn', 'k_proj', x, placed, delta);
    const v = this.#linear(layer, 'self_attn', 'v_proj', x, placed, delta);
    // Runs of segments of one sequence length, in row order.
    const runs: { seq: number; batch: number; offset: number; rows: number }[] = [];
    for (const a of placed) {
      const s = segments[a.index];
      const prev = runs.at(-1);
      if (prev !== undefined && prev.seq === s.seq) {
        prev.batch += s.batch;
        prev.rows += a.rows;
      } else runs.push({ seq: s.seq, batch: s.batch, offset: a.offset, rows: a.rows });
    }
    const g = nH / nKv;
    const merged = runs.map((run) => {
      const { seq: s, batch: b } = run;
      const { cos, sin, mask } = this.#table(s);
      const part = (t: tf.Tensor2D): tf.Tensor2D => (runs.length === 1 ? t : (tf.slice(t, [run.offset, 0], [run.rows, t.shape[1]]) as tf.Tensor2D));
      const heads = (t: tf.Tensor2D, n: number) => tf.transpose(tf.reshape(part(t), [b, s, n, hd]), [0, 2, 1, 3]) as tf.Tensor4D;
      const qh = rope(heads(q, nH), cos, sin);
      const kh = rope(heads(k, nKv), cos, sin);
      const vh = heads(v, nKv);
      const qg = tf.reshape(qh, [b * nKv, g * s, hd]);
      const kg = tf.reshape(kh, [b * nKv, s, hd]);
      const vg = tf.reshape(vh, [b * nKv, s, hd]);
      const probs = maskedSoftmax(batchMatMul(qg as tf.Tensor3D, transposeLast(kg) as tf.Tensor3D), 1 / Math.sqrt(hd), mask);
      const ctx = tf.reshape(batchMatMul(probs as tf.Tensor3D, vg as tf.Tensor3D), [b, nH, s, hd]);
      return tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [b * s, nH * hd]) as tf.Tensor2D;
    });
    const ctxRows = merged.length === 1 ? merged[0] : (tf.concat(merged, 0) as tf.Tensor2D);
    return this.#linear(layer, 'self_attn', 'o_proj', ctxRows, placed, delta);
  }
}
