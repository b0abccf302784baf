// Linear layers and batched matmuls whose forward and backward run plain row-major matmuls.
import { as2D } from './ranked.ts';
import { tf } from './tf.ts';

// wasm's BatchMatMul is about ten times slower when asked to transpose an operand
// (XNNPACK gets a strided view it cannot pack) than on plain row-major operands, and the
// gradients tfjs registers for MatMul ask for exactly those transposes. These two ops
// transpose explicitly (cheap: activation-sized) and carry their own gradients, so forward
// and backward both run plain matmuls on every backend.

const swapLast = (t: tf.Tensor): tf.Tensor => {
  const perm = t.shape.map((_, i) => i);
  perm[perm.length - 1] = perm.length - 2;
  perm[perm.length - 2] = perm.length - 1;
  return tf.transpose(t, perm);
};

/** y = x W^T for a W that receives a gradient: x [n, in], W [out, in] (PyTorch's layout) → [n, out]. */
const trainedLinear = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [x, w, save] = args as [tf.Tensor2D, tf.Tensor2D, tf.GradSaveFunc];
  save([x, w]);
  return {
    value: tf.transpose(tf.matMul(w, tf.transpose(x))),
    gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => {
      const g = dy as tf.Tensor2D;
      const [xs, ws] = saved as [tf.Tensor2D, tf.Tensor2D];
      return [tf.matMul(g, ws), tf.matMul(tf.transpose(g) as tf.Tensor2D, xs)];
    },
  };
}) as (x: tf.Tensor2D, w: tf.Tensor2D) => tf.Tensor2D;

// A custom gradient computes the gradient of every input it is given, wanted or not; a
// frozen weight is therefore closed over rather than passed, so no [out, in] gradient is
// computed for it (that would double a PEFT step's backward).
const frozenLinears = new WeakMap<tf.Variable, (x: tf.Tensor2D) => tf.Tensor2D>();

function frozenLinear(w: tf.Variable): (x: tf.Tensor2D) => tf.Tensor2D {
  let f = frozenLinears.get(w);
  if (!f) {
    const w2 = as2D(w);
    f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
      const [x] = args as [tf.Tensor2D];
      return {
        value: tf.transpose(tf.matMul(w2, tf.transpose(x))),
        gradFunc: (dy: tf.Tensor | tf.Tensor[]) => [tf.matMul(dy as tf.Tensor2D, w2)],
      };
    }) as (x: tf.Tensor2D) => tf.Tensor2D;
    frozenLinears.set(w, f);
  }
  return f;
}

/**
 * y = x W^T: x [n, in], W [out, in] (PyTorch's layout) → [n, out]. A W that is a Variable
 * with trainable = false gets no gradient; any other W (trainable, or computed) does.
 */
export function linear(x: tf.Tensor, w: tf.Tensor): tf.Tensor2D {
  const x2 = as2D(x);
  return w instanceof tf.Variable && !w.trainable ? frozenLinear(w)(x2) : trainedLinear(x2, as2D(w));
}

/** Batched a @ b on plain operands, [..., m, k] @ [..., k, n], with a gradient of plain matmuls. */
export const batchMatMul = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [a, b, save] = args as [tf.Tensor3D, tf.Tensor3D, tf.GradSaveFunc];
  save([a, b]);
  return {
    value: tf.matMul(a, b),
    gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => {
      const g = dy as tf.Tensor3D;
      const [as, bs] = saved;
      return [tf.matMul(g, swapLast(bs) as tf.Tensor3D), tf.matMul(swapLast(as) as tf.Tensor3D, g)];
    },
  };
}) as (a: tf.Tensor3D, b: tf.Tensor3D) => tf.Tensor3D;

/** Swaps the last two axes. */
export function transposeLast<T extends tf.Tensor>(t: T): T {
  return swapLast(t) as T;
}
