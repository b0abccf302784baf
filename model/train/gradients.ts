// Gradients with respect to variables and plain tensors together, with an optional
// upstream gradient: what the cut needs (dL/dh_M and the top's weights from one backward;
// the bottom's vector-Jacobian product with g_B). tfjs's public tf.grads and
// tf.variableGrads each do only half of that. backend.ts's `gradients` does both, and frees
// each intermediate gradient as soon as backward has used it.
import { gradients, tf } from '../backend.ts';

export interface GradientsResult<T extends tf.Tensor> {
  value: T;
  /** One entry per x: undefined where y does not depend on x. */
  grads: (tf.Tensor | undefined)[];
}

/**
 * Runs f under a gradient tape and backpropagates dy (ones when absent) to every x.
 * The caller owns `value` and the gradients.
 */
export function gradientsOf<T extends tf.Tensor>(f: () => T, xs: tf.Tensor[], dy?: T): GradientsResult<T> {
  return gradients(f, xs, dy);
}

/** The trainable variables among `vars` that f's result depends on (a probe on a small input). */
export function variablesReached(f: () => tf.Tensor, vars: ReadonlyMap<string, tf.Variable>): Set<string> {
  const names = [...vars.keys()];
  if (names.length === 0) return new Set();
  const { value, grads } = gradientsOf(f, names.map((n) => vars.get(n) as tf.Variable));
  const reached = new Set<string>();
  grads.forEach((g, i) => {
    if (g) reached.add(names[i]);
  });
  tf.dispose([value, ...grads.filter((g): g is tf.Tensor => g !== undefined)]);
  return reached;
}
