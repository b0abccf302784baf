// LoRA-FA's gradient projection, as PEFT's LoraFAOptimizer (peft/optimizers/lorafa.py) applies
// it before its AdamW update: with A frozen, B's gradient becomes
//   grad_B <- (1/s^2) · grad_B · pinv(A A^T + δ I),  δ = 1e-8, s = the LoRA scaling,
// so that the update of B A approximates full fine-tuning's projected onto A's row space.
import { as2D, tf } from '../../backend.ts';
import { symmetricEigen } from '../../linalg.ts';

/** PEFT's δ, added to A A^T before the pseudo-inverse. */
export const LORA_FA_DELTA = 1e-8;

/** The symmetric [r, r] matrix (1/s^2) · pinv(A A^T + δ I) in float64, row-major. */
export function loraFaProjection(a: tf.Tensor, scaling: number): Float64Array {
  const [r, n] = a.shape;
  const av = a.dataSync();
  const m = new Float64Array(r * r);
  for (let i = 0; i < r; i++) {
    for (let j = i; j < r; j++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += av[i * n + k] * av[j * n + k];
      m[i * r + j] = s;
      m[j * r + i] = s;
    }
    m[i * r + i] += LORA_FA_DELTA;
  }
  const p = symmetricPinv(m, r);
  const f = 1 / (scaling * scaling);
  for (let i = 0; i < p.length; i++) p[i] *= f;
  return p;
}

/**
 * The pseudo-inverse of a symmetric matrix by Jacobi eigen-decomposition, with torch.linalg.pinv's
 * default cut-off for float32 input: eigenvalues below r · eps(f32) · the largest are dropped.
 */
export function symmetricPinv(m: Float64Array, r: number): Float64Array {
  const { values, vectors: v } = symmetricEigen(m, r);
  const eig = Array.from(values);
  const cutoff = r * 2 ** -23 * Math.max(...eig.map(Math.abs));
  const out = new Float64Array(r * r);
  for (let k = 0; k < r; k++) {
    if (Math.abs(eig[k]) <= cutoff) continue;
    const inv = 1 / eig[k];
    for (let i = 0; i < r; i++) for (let j = 0; j < r; j++) out[i * r + j] += v[i * r + k] * inv * v[j * r + k];
  }
  return out;
}

/** grad_B [out, r] projected: grad_B · P. */
export function projectLoraFaGradient(gradB: tf.Tensor, a: tf.Tensor, scaling: number): tf.Tensor {
  const r = a.shape[0];
  const p = loraFaProjection(a, scaling);
  return tf.tidy(() => tf.matMul(as2D(gradB), tf.tensor2d(Float32Array.from(p), [r, r])));
}
