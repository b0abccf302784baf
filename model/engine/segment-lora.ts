// Each segment's own LoRA on top of the shared base matmul of a packed batch (Punica's SGMV,
// in tfjs ops): the base weight multiplies every token of every segment once (PackedBlocks);
// this adds, per linear layer, scale · (x_s A_sᵀ) B_sᵀ on the rows of each segment s that
// holds a LoRA for that module, and nothing on the others. The low-rank products cost
// 2·r·(in + out) per token against in·out for the base.
import { tf } from '../backend.ts';
import type { LinearModuleName } from '../hooks.ts';
import type { ActiveSegment, PackedLinearDelta } from './packed-blocks.ts';

/** One module's LoRA factors: A [r, in], B [out, r], and alpha / r. */
export interface LoraFactors {
  a: tf.Tensor2D;
  b: tf.Tensor2D;
  scale: number;
}

/** A segment's LoRA: factors by module path (`model.layers.{i}.{self_attn|mlp}.{name}`). */
export type SegmentLora = ReadonlyMap<string, LoraFactors>;

const GROUP_OF: Record<LinearModuleName, 'self_attn' | 'mlp'> = {
  q_proj: 'self_attn', k_proj: 'self_attn', v_proj: 'self_attn', o_proj: 'self_attn', gate_proj: 'mlp', up_proj: 'mlp', down_proj: 'mlp',
};

/** The delta for PackedBlocks.run: loras[k] is segment k's LoRA, or undefined for none. */
export function segmentLoraDelta(loras: readonly (SegmentLora | undefined)[]): PackedLinearDelta {
  return (layer: number, name: LinearModuleName, x: tf.Tensor2D, active: readonly ActiveSegment[]): tf.Tensor2D | undefined => {
    const path = `model.layers.${layer}.${GROUP_OF[name]}.${name}`;
    const factors = active.map((a) => loras[a.index]?.get(path));
    if (factors.every((f) => f === undefined)) return undefined;
    const out = factors.find((f) => f !== undefined)?.b.shape[0] ?? 0;
    const stacked = stackedDelta(x, active, factors);
    if (stacked !== undefined) return stacked;
    const parts = active.map((a, k) => {
      const f = factors[k];
      if (f === undefined) return tf.zeros([a.rows, out]) as tf.Tensor2D;
      const rows = active.length === 1 ? x : (tf.slice(x, [a.offset, 0], [a.rows, x.shape[1]]) as tf.Tensor2D);
      return tf.mul(tf.matMul(tf.matMul(rows, f.a, false, true), f.b, false, true), f.scale) as tf.Tensor2D;
    });
    return parts.length === 1 ? parts[0] : (tf.concat(parts, 0) as tf.Tensor2D);
  };
}

/**
 * When every active segment has a LoRA of one rank for the module and all have the same rows
 * (the common case: sessions of one micro-batch shape), the low-rank parts of all of them are
 * two batched matmuls, [S, rows, in] @ [S, in, r] @ [S, r, out], instead of two per segment.
 */
function stackedDelta(x: tf.Tensor2D, active: readonly ActiveSegment[], factors: readonly (LoraFactors | undefined)[]): tf.Tensor2D | undefined {
  if (active.length < 2) return undefined;
  const present = factors.filter((f): f is LoraFactors => f !== undefined);
  if (present.length !== active.length) return undefined;
  const rows = active[0].rows;
  const r = present[0].a.shape[0];
  if (active.some((a) => a.rows !== rows) || present.some((f) => f.a.shape[0] !== r)) return undefined;
  const S = active.length;
  const a = tf.stack(present.map((f) => f.a)) as tf.Tensor3D;
  const b = tf.stack(present.map((f) => f.b)) as tf.Tensor3D;
  const x3 = tf.reshape(x, [S, rows, x.shape[1]]) as tf.Tensor3D;
  let y = tf.matMul(tf.matMul(x3, a, false, true), b, false, true);
  const scales = present.map((f) => f.scale);
  y = scales.every((v) => v === scales[0]) ? tf.mul(y, scales[0]) : tf.mul(y, tf.tensor3d(scales, [S, 1, 1]));
  return tf.reshape(y, [S * rows, b.shape[1]]) as tf.Tensor2D;
}
