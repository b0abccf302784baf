// Ops with their own gradient, written as a record (value, saved tensors, gradient).
import { tf } from './tf.ts';

/** What a custom op computes: its value, the tensors its gradient needs, and the gradient of each input. */
export interface CustomOpResult {
  value: tf.Tensor;
  save?: tf.Tensor[];
  gradients: (dy: tf.Tensor, saved: tf.Tensor[]) => tf.Tensor[];
}

/**
 * An op with its own gradient, typed (tf.customGrad's own signature needs casts). The
 * gradient of every input is computed when backward reaches the op, so constants belong in
 * the closure, not among the inputs.
 */
export function customOp<A extends tf.Tensor[]>(f: (...inputs: A) => CustomOpResult): (...inputs: A) => tf.Tensor {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const result = f(...(args.slice(0, -1) as A));
    save(result.save ?? []);
    return { value: result.value, gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => result.gradients(dy as tf.Tensor, saved) };
  });
  return (...inputs: A) => op(...inputs) as tf.Tensor;
}
