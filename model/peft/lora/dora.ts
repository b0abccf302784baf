// DoRA (weight-decomposed LoRA) as PEFT computes it (tuners/lora/dora.py, DoraLinearLayer).
import { tf } from '../../backend.ts';
import { rowNorm, stopGradient } from '../ops.ts';

/** ||W + s B A|| per output row: PEFT's weight_norm over dim=1 of the [out, in] weight. */
export function doraWeightNorm(weight: tf.Tensor2D, a: tf.Tensor2D, b: tf.Tensor2D, scaling: number): tf.Tensor1D {
  return tf.tidy(() => rowNorm(tf.add(weight, tf.mul(tf.matMul(b, a), scaling)) as tf.Tensor2D));
}

/**
 * The DoRA term added to the base output y = x W^T + b:
 *   (m / n - 1) * (x W^T) + (m / n) * s * x A^T B^T,  n = ||W + s B A|| (row-wise).
 * As PEFT does (following section 4.3 of the DoRA paper), n is detached: it reflects the
 * current B A but passes no gradient. `baseNoBias` is x W^T for the same x the LoRA
 * branch saw (PEFT recomputes it from the dropped-out x while dropout is active).
 */
export function doraDelta(baseNoBias: tf.Tensor2D, loraOut: tf.Tensor2D, magnitude: tf.Tensor1D, norm: tf.Tensor1D, scaling: number): tf.Tensor2D {
  const scale = tf.div(magnitude, stopGradient(norm));
  return tf.add(tf.mul(tf.sub(scale, 1), baseNoBias), tf.mul(tf.mul(loraOut, scale), scaling)) as tf.Tensor2D;
}

/** The merged weight: (m / ||W + s B A||)[:, None] * (W + s B A); the bias is left alone, as in PEFT. */
export function doraMergedWeight(weight: tf.Tensor2D, a: tf.Tensor2D, b: tf.Tensor2D, magnitude: tf.Tensor1D, scaling: number): tf.Tensor2D {
  return tf.tidy(() => {
    const w = tf.add(weight, tf.mul(tf.matMul(b, a), scaling)) as tf.Tensor2D;
    return tf.mul(w, tf.reshape(tf.div(magnitude, rowNorm(w)), [-1, 1])) as tf.Tensor2D;
  });
}
