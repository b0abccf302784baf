import { tf } from '../backend.ts';

/**
 * torch.nn.utils.clip_grad_norm_: scales every gradient by min(1, maxNorm / (‖g‖ + 1e-6)),
 * where ‖g‖ is the L2 norm over all gradients together. Returns that norm (before clipping)
 * and the gradients, replacing (and disposing) the ones given when they are scaled.
 */
export function clipGradNorm(grads: Map<string, tf.Tensor>, maxNorm: number): number {
  const total = tf.tidy(() => {
    const squares = [...grads.values()].map((g) => tf.sum(tf.square(g)));
    return squares.length === 0 ? 0 : Math.sqrt(tf.addN(squares).dataSync()[0]);
  });
  const coef = maxNorm / (total + 1e-6);
  if (coef < 1) {
    for (const [name, g] of grads) {
      grads.set(name, tf.tidy(() => tf.mul(g, coef)));
      g.dispose();
    }
  }
  return total;
}
