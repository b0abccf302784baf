import { tf } from './backend.ts';

/** Labels with this value add nothing to the loss (Hugging Face's convention). */
export const IGNORE_INDEX = -100;

/**
 * Causal-LM cross-entropy: position t predicts label t+1, labels equal to `ignoreIndex` are
 * skipped, and the result is the mean over the counted tokens. Returns the summed loss as
 * well, so gradient accumulation can weight micro-batches by their token counts.
 */
export function causalLmLoss(logits: tf.Tensor3D, labels: tf.Tensor2D, ignoreIndex = IGNORE_INDEX): { loss: tf.Scalar; sum: tf.Scalar; count: number } {
  const [b, s, v] = logits.shape;
  const labelData = labels.dataSync();
  let count = 0;
  for (let i = 0; i < b; i++) for (let t = 1; t < s; t++) if (labelData[i * s + t] !== ignoreIndex) count++;
  const [loss, sum] = tf.tidy(() => {
    const shifted = tf.reshape(tf.slice(logits, [0, 0, 0], [b, s - 1, v]), [b * (s - 1), v]);
    const target = tf.reshape(tf.slice(labels, [0, 1], [b, s - 1]), [b * (s - 1)]);
    const valid = tf.notEqual(target, tf.scalar(ignoreIndex, 'int32'));
    const safe = tf.where(valid, target, tf.zerosLike(target)) as tf.Tensor1D;
    const logp = tf.logSoftmax(shifted);
    const picked = tf.sum(tf.mul(logp, tf.oneHot(safe, v)), -1);
    const total = tf.neg(tf.sum(tf.mul(picked, tf.cast(valid, 'float32'))));
    return [tf.div(total, Math.max(count, 1)) as tf.Scalar, total as tf.Scalar];
  });
  return { loss, sum, count };
}
