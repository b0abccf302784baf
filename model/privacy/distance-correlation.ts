// NoPeek (Vepakomma et al.): the edge adds α·dCor(x, h_B) to its loss, the distance
// correlation between what went in (the token embeddings of the frozen base, which no
// parameter changes) and what it sends, so training pushes h_B to carry less of x.
import { tf } from '../backend.ts';

/** Pairwise Euclidean distances of the rows of x [n, d], double-centred. */
function centredDistances(x: tf.Tensor2D): tf.Tensor2D {
  const sq = tf.sum(tf.square(x), 1, true);
  const d2 = tf.relu(tf.add(tf.sub(sq, tf.mul(2, tf.matMul(x, x, false, true))), tf.transpose(sq)));
  const d = tf.sqrt(tf.add(d2, 1e-12));
  return tf.add(tf.sub(tf.sub(d, tf.mean(d, 0, true)), tf.mean(d, 1, true)), tf.mean(d)) as tf.Tensor2D;
}

/** The sample distance correlation of rows of x [n, dx] and z [n, dz], in [0, 1]. */
export function distanceCorrelation(x: tf.Tensor2D, z: tf.Tensor2D): tf.Scalar {
  return tf.tidy(() => {
    const a = centredDistances(x);
    const b = centredDistances(z);
    const xy = tf.mean(tf.mul(a, b));
    const xx = tf.mean(tf.mul(a, a));
    const yy = tf.mean(tf.mul(b, b));
    return tf.sqrt(tf.div(tf.relu(xy), tf.add(tf.sqrt(tf.mul(xx, yy)), 1e-12))) as tf.Scalar;
  });
}

/**
 * d(α·dCor(x, h))/dh for a micro-batch: x and h [batch, seq, ·] with every token one row.
 * The caller adds it to g_B before the bottom's backward.
 */
export function noPeekGradient(x: tf.Tensor3D, h: tf.Tensor3D, weight: number): tf.Tensor3D {
  return tf.tidy(() => {
    const xs = tf.reshape(x, [-1, x.shape[2]]) as tf.Tensor2D;
    const g = tf.grad((hh: tf.Tensor) => tf.mul(weight, distanceCorrelation(xs, tf.reshape(hh, [-1, h.shape[2]]) as tf.Tensor2D)))(h);
    return g as tf.Tensor3D;
  });
}
