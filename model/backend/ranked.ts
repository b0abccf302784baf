// tfjs types a Variable or a computed tensor as tf.Tensor<Rank>; its ops want the rank in the
// type. These helpers are the one place that narrows, and they check the rank they claim.
import type { tf } from './tf.ts';

function checked<T extends tf.Tensor>(t: tf.Tensor | undefined, rank: number): T | undefined {
  if (t === undefined) return undefined;
  if (t.rank !== rank) throw new Error(`expected a rank-${rank} tensor, got shape [${t.shape.join(', ')}]`);
  return t as T;
}

/** t as a matrix; throws if it is not rank 2. */
export function as2D(t: tf.Tensor): tf.Tensor2D;
export function as2D(t: tf.Tensor | undefined): tf.Tensor2D | undefined;
export function as2D(t: tf.Tensor | undefined): tf.Tensor2D | undefined {
  return checked<tf.Tensor2D>(t, 2);
}

/** t as a vector; throws if it is not rank 1. */
export function as1D(t: tf.Tensor): tf.Tensor1D;
export function as1D(t: tf.Tensor | undefined): tf.Tensor1D | undefined;
export function as1D(t: tf.Tensor | undefined): tf.Tensor1D | undefined {
  return checked<tf.Tensor1D>(t, 1);
}

/** t as a rank-3 tensor; throws if it is not rank 3. */
export function as3D(t: tf.Tensor): tf.Tensor3D;
export function as3D(t: tf.Tensor | undefined): tf.Tensor3D | undefined;
export function as3D(t: tf.Tensor | undefined): tf.Tensor3D | undefined {
  return checked<tf.Tensor3D>(t, 3);
}
