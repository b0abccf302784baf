// The LLaMA block's elementwise pieces as single ops with their own gradients. Written with
// tfjs's primitive ops, backward would keep every intermediate (each multiply keeps both of
// its inputs, each add too): about 56 MiB a block for SmolLM-135M at 256 tokens. These keep
// only what their gradient needs, and run fewer kernels.
import { customOp, tf } from '../backend.ts';

/** HF's rotate_half: [x1, x2] → [-x2, x1] along the last axis. */
function rotateHalf(x: tf.Tensor4D): tf.Tensor4D {
  const [b, h, s, d] = x.shape;
  const half = d / 2;
  return tf.concat([tf.neg(tf.slice(x, [0, 0, 0, half], [b, h, s, half])), tf.slice(x, [0, 0, 0, 0], [b, h, s, half])], 3);
}

/** The transpose of rotate_half: [z1, z2] → [z2, -z1]. */
function rotateHalfTransposed(z: tf.Tensor4D): tf.Tensor4D {
  const [b, h, s, d] = z.shape;
  const half = d / 2;
  return tf.concat([tf.slice(z, [0, 0, 0, half], [b, h, s, half]), tf.neg(tf.slice(z, [0, 0, 0, 0], [b, h, s, half]))], 3);
}

/** Rotary embedding, x cos + rotate_half(x) sin, for x [batch, heads, seq, headDim]. It is linear in x: nothing is kept. */
export function rope(x: tf.Tensor4D, cos: tf.Tensor2D, sin: tf.Tensor2D): tf.Tensor4D {
  return customOp((input: tf.Tensor) => ({
    value: tf.add(tf.mul(input, cos), tf.mul(rotateHalf(input as tf.Tensor4D), sin)),
    gradients: (dy) => [tf.add(tf.mul(dy, cos), rotateHalfTransposed(tf.mul(dy, sin) as tf.Tensor4D))],
  }))(x) as tf.Tensor4D;
}

/** RMSNorm, x / sqrt(mean(x²) + eps) · w over the last axis; keeps the normalised x and 1/rms. */
export function rmsNorm(x: tf.Tensor, weight: tf.Tensor, eps: number): tf.Tensor {
  return customOp((input: tf.Tensor, w: tf.Tensor) => {
    const r = tf.rsqrt(tf.add(tf.mean(tf.square(input), -1, true), eps));
    const n = tf.mul(input, r);
    return {
      value: tf.mul(n, w),
      save: [n, r, w],
      gradients: (dy, [ns, rs, ws]) => {
        const dn = tf.mul(dy, ws);
        const dx = tf.mul(rs, tf.sub(dn, tf.mul(ns, tf.mean(tf.mul(dn, ns), -1, true))));
        const dw = tf.sum(tf.reshape(tf.mul(dy, ns), [-1, ws.size]), 0);
        return [dx, dw];
      },
    };
  })(x, weight);
}

/** SwiGLU's product, silu(gate) · up; keeps gate and up. */
export function swiglu(gate: tf.Tensor, up: tf.Tensor): tf.Tensor {
  return customOp((g: tf.Tensor, u: tf.Tensor) => ({
    value: tf.mul(tf.mul(g, tf.sigmoid(g)), u),
    save: [g, u],
    gradients: (dy, [gs, us]) => {
      const s = tf.sigmoid(gs);
      const silu = tf.mul(gs, s);
      // d silu / d g = s + g s (1 - s) = s (1 + g - silu)
      const dSilu = tf.mul(s, tf.sub(tf.add(gs, 1), silu));
      return [tf.mul(tf.mul(dy, us), dSilu), tf.mul(dy, silu)];
    },
  }))(gate, up);
}

/** softmax(scores · scale + mask) over the last axis; keeps only its output. */
export function maskedSoftmax(scores: tf.Tensor, scale: number, mask: tf.Tensor): tf.Tensor {
  return customOp((z: tf.Tensor) => {
    const y = tf.softmax(tf.add(tf.mul(z, scale), mask));
    return {
      value: y,
      save: [y],
      gradients: (dy, [ys]) => [tf.mul(tf.mul(ys, tf.sub(dy, tf.sum(tf.mul(dy, ys), -1, true))), scale)],
    };
  })(scores);
}
