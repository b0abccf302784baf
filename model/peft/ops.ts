// Small tensor helpers the PEFT methods share: seeded initializers, seeded dropout and a
// gradient stop.
import { tf } from '../backend.ts';
import type { Rng } from '../random.ts';

/** U(-bound, bound): torch's kaiming_uniform_(a=sqrt(5)) on a [out, in] weight has bound 1/sqrt(in). */
export function uniformValues(rng: Rng, size: number, bound: number): Float32Array {
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) out[i] = (2 * rng.next() - 1) * bound;
  return out;
}

export function normalValues(rng: Rng, size: number, std: number): Float32Array {
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) out[i] = rng.normal() * std;
  return out;
}

/** A float32 variable from values; `trainable` decides whether tf.variableGrads sees it. */
export function variableFrom(values: Float32Array, shape: number[], trainable: boolean): tf.Variable {
  return tf.tidy(() => tf.variable(tf.tensor(values, shape, 'float32'), trainable));
}

export function filledVariable(shape: number[], value: number, trainable: boolean): tf.Variable {
  return tf.tidy(() => tf.variable(tf.fill(shape, value, 'float32'), trainable));
}

/** Dropout with a seed from the method's generator, only while training. */
export function dropout(x: tf.Tensor2D, rate: number, training: boolean, rng: Rng): tf.Tensor2D {
  if (!training || rate === 0) return x;
  return tf.dropout(x, rate, undefined, rng.seed()) as tf.Tensor2D;
}

// customGrad passes the inputs and then a save function in one rest list.
const stop = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => ({ value: tf.clone(args[0] as tf.Tensor), gradFunc: (dy: tf.Tensor) => tf.zerosLike(dy) }));

/** x in the forward pass, a constant for the backward pass (torch's .detach()). */
export function stopGradient<T extends tf.Tensor>(x: T): T {
  return stop(x) as T;
}

/** L2 norm of each row of a [out, in] matrix: torch.linalg.norm(W, dim=1). */
export function rowNorm(w: tf.Tensor2D): tf.Tensor1D {
  return tf.sqrt(tf.sum(tf.square(w), 1)) as tf.Tensor1D;
}

/** A copy that outlives the current tidy scope (kept to undo a merge exactly). */
export function keepCopy(t: tf.Tensor): tf.Tensor {
  return tf.keep(tf.clone(t));
}
