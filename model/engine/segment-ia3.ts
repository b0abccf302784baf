// Each segment's own (IA)^3 on top of the shared base matmul of a packed batch: a segment with
// an output scale l on a module gets base(x)·(l − 1) added to its rows (so the rows come out as
// base(x)·l), one with an input scale (a feedforward module) W(x·(l − 1)); the others nothing.
// Unlike LoRA the addition needs the base weight once more on that segment's rows.
import { tf } from '../backend.ts';
import type { LinearModuleName } from '../hooks.ts';
import type { ActiveSegment, PackedLinearDelta } from './packed-blocks.ts';
import { modulePath } from './llama-graphs.ts';

/** One module's (IA)^3 scale: [1, out] scaling the output, or [1, in] scaling the input (feedforward). */
export interface Ia3Scale {
  scale: tf.Tensor2D;
  feedforward: boolean;
}

/** A segment's (IA)^3: scales by module path. */
export type SegmentIa3 = ReadonlyMap<string, Ia3Scale>;

/** The delta for PackedBlocks.run; `weightOf(path)` is the module's base weight [out, in] and bias. */
export function segmentIa3Delta(ia3s: readonly (SegmentIa3 | undefined)[], weightOf: (path: string) => { weight: tf.Tensor2D; bias?: tf.Tensor1D }): PackedLinearDelta {
  return (layer: number, name: LinearModuleName, x: tf.Tensor2D, active: readonly ActiveSegment[]): tf.Tensor2D | undefined => {
    const path = modulePath(layer, name);
    const scales = active.map((a) => ia3s[a.index]?.get(path));
    if (scales.every((s) => s === undefined)) return undefined;
    const { weight, bias } = weightOf(path);
    const out = weight.shape[0];
    const parts = active.map((a, k) => {
      const s = scales[k];
      if (s === undefined) return tf.zeros([a.rows, out]) as tf.Tensor2D;
      const rows = active.length === 1 ? x : (tf.slice(x, [a.offset, 0], [a.rows, x.shape[1]]) as tf.Tensor2D);
      const less = tf.sub(s.scale, 1);
      if (s.feedforward) return tf.matMul(tf.mul(rows, less), weight, false, true) as tf.Tensor2D;
      const base = tf.matMul(rows, weight, false, true);
      return tf.mul(bias === undefined ? base : tf.add(base, bias), less) as tf.Tensor2D;
    });
    return parts.length === 1 ? parts[0] : (tf.concat(parts, 0) as tf.Tensor2D);
  };
}

/** Deltas added together (a batch whose segments hold LoRAs and (IA)^3s). */
export function sumDeltas(deltas: readonly PackedLinearDelta[]): PackedLinearDelta {
  return (layer, name, x, active) => {
    let sum: tf.Tensor2D | undefined;
    for (const d of deltas) {
      const y = d(layer, name, x, active);
      if (y !== undefined) sum = sum === undefined ? y : (tf.add(sum, y) as tf.Tensor2D);
    }
    return sum;
  };
}
