// Token inversion from h_B by an honest-but-curious cloud that holds the frozen base (not the
// edge's adapter): nearest-neighbour search through the base's bottom blocks, and a learned
// linear inversion trained on public text run through the same bottom.
import { tf } from '../backend.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { Rng } from '../random.ts';
import { noiseHiddenInPlace } from './defenses.ts';
import type { Defenses, HiddenNoise } from './defenses.ts';

/** h_B of the base for rows of equal length: embedding, then blocks [0, bottom). Flat [rows, seq, hidden]. */
export function baseBottom(model: LlamaModel, rows: readonly (readonly number[])[], bottom: number): Float32Array {
  const seq = rows[0]?.length ?? 0;
  return tf.tidy(() => {
    const ids = tf.tensor2d(rows.flat(), [rows.length, seq], 'int32');
    const h0 = model.embed(ids);
    const h = bottom > 0 ? model.blocks(h0, 0, bottom, { positionOffset: 0 }) : h0;
    return h.dataSync() as Float32Array;
  });
}

/** What the cloud receives for these rows under the defenses (the noise defense's clip already fixed). */
export function observedBottom(model: LlamaModel, rows: readonly (readonly number[])[], bottom: number, defenses: Defenses, rng: Rng): Float32Array {
  const h = Float32Array.from(baseBottom(model, rows, bottom));
  if (defenses.noise) noiseHiddenInPlace(h, model.config.hiddenSize, defenses.noise, rng);
  return h;
}

export interface InversionResult {
  /** Tokens recovered / tokens attacked. */
  recovery: number;
  tokens: number;
}

/**
 * Nearest-neighbour inversion, left to right: at position t the `candidates` tokens whose
 * context-free h_B (the token alone at position t) is closest to what was observed are run
 * through the base bottom after the prefix recovered so far (greedy), and the one whose h_B at
 * t is closest (L2) is taken. `candidates` = vocabulary size makes the search exhaustive.
 * Under the noise defense (whose σ, clip and shape the cloud knows from Hello) the candidates
 * are clipped as the edge clips, and the distance is the Gaussian likelihood's: each dimension
 * weighted by the inverse of its noise variance.
 */
export function nearestNeighbourInversion(
  model: LlamaModel,
  rows: readonly (readonly number[])[],
  observed: Float32Array,
  bottom: number,
  candidates = 64,
  noise?: HiddenNoise,
): InversionResult {
  const d = model.config.hiddenSize;
  const V = model.config.vocabSize;
  const k = Math.min(Math.max(1, Math.floor(candidates)), V);
  const seq = rows[0]?.length ?? 0;
  let hits = 0;
  let tokens = 0;
  const run = (ids: tf.Tensor2D): tf.Tensor3D => {
    const h0 = model.embed(ids);
    return bottom > 0 ? model.blocks(h0, 0, bottom, { positionOffset: 0 }) : h0;
  };
  const clip = noise && noise.clip > 0 ? noise.clip : 0;
  /** Rows of x [n, d] clipped to the defense's norm, as the edge sends them. */
  const clipped = (x: tf.Tensor2D): tf.Tensor2D => (clip > 0 ? tf.mul(x, tf.minimum(1, tf.div(clip, tf.maximum(tf.norm(x, 'euclidean', 1, true), 1e-30)))) : x);
  const weights = noise?.scales ? tf.tensor1d(noise.scales.map((x) => 1 / Math.max(x * x, 1e-12))) : undefined;
  const distance = (x: tf.Tensor2D, goal: tf.Tensor1D): tf.Tensor1D => {
    const sq = tf.square(tf.sub(x, goal));
    return tf.sum(weights ? tf.mul(sq, weights) : sq, 1);
  };
  // A token alone attends only to itself, so its h_B does not depend on its position.
  const alone = tf.tidy(() => clipped(tf.reshape(run(tf.tensor2d(Array.from({ length: V }, (_, v) => v), [V, 1], 'int32')), [V, d])));
  try {
    for (let r = 0; r < rows.length; r++) {
      const recovered: number[] = [];
      for (let t = 0; t < seq; t++) {
        const target = observed.subarray((r * seq + t) * d, (r * seq + t + 1) * d);
        const best = tf.tidy(() => {
          const goal = tf.tensor1d(target);
          const shortlist = Array.from(tf.topk(tf.neg(distance(alone, goal)), k).indices.dataSync());
          if (t === 0 || k === 1) return shortlist[0];
          const ids = tf.tensor2d(shortlist.flatMap((v) => [...recovered, v]), [k, t + 1], 'int32');
          const last = clipped(tf.reshape(tf.slice(run(ids), [0, t, 0], [k, 1, d]), [k, d]));
          return shortlist[tf.argMin(distance(last, goal)).dataSync()[0]];
        });
        recovered.push(best);
        if (best === rows[r][t]) hits++;
        tokens++;
      }
    }
  } finally {
    alone.dispose();
    weights?.dispose();
  }
  return { recovery: tokens === 0 ? 0 : hits / tokens, tokens };
}

export interface LearnedInversionOptions {
  /** Rows of public text (token ids, equal length) the attacker trains on. */
  publicRows: readonly (readonly number[])[];
  /** Ridge penalty of the least-squares fit, relative to the mean diagonal of XᵀX. */
  ridge?: number;
  seed?: number;
}

/** Solves A x = b in place for a symmetric positive definite A (n×n, row-major) by Cholesky; b holds m right-hand sides (n×m). */
function solveSpd(a: Float64Array, b: Float64Array, n: number, m: number): void {
  for (let j = 0; j < n; j++) {
    let s = a[j * n + j];
    for (let k = 0; k < j; k++) s -= a[j * n + k] ** 2;
    const l = Math.sqrt(Math.max(s, 1e-12));
    a[j * n + j] = l;
    for (let i = j + 1; i < n; i++) {
      let t = a[i * n + j];
      for (let k = 0; k < j; k++) t -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = t / l;
    }
  }
  for (let c = 0; c < m; c++) {
    for (let i = 0; i < n; i++) {
      let t = b[i * m + c];
      for (let k = 0; k < i; k++) t -= a[i * n + k] * b[k * m + c];
      b[i * m + c] = t / a[i * n + i];
    }
    for (let i = n - 1; i >= 0; i--) {
      let t = b[i * m + c];
      for (let k = i + 1; k < n; k++) t -= a[k * n + i] * b[k * m + c];
      b[i * m + c] = t / a[i * n + i];
    }
  }
}

/**
 * A learned inversion: a linear map h_B[t] → token logits (with a bias), fitted by ridge least
 * squares to one-hot tokens of public text run through the base bottom under the same
 * defenses (the cloud knows what was negotiated), then applied to what was observed.
 */
export function learnedInversion(
  model: LlamaModel,
  rows: readonly (readonly number[])[],
  observed: Float32Array,
  bottom: number,
  defenses: Defenses,
  options: LearnedInversionOptions,
): InversionResult {
  const d = model.config.hiddenSize;
  const V = model.config.vocabSize;
  const n1 = d + 1;
  const rng = new Rng(options.seed ?? 1);
  const x = observedBottom(model, options.publicRows, bottom, defenses, rng);
  const y = options.publicRows.flat();
  const xtx = new Float64Array(n1 * n1);
  const xty = new Float64Array(n1 * V);
  const row = new Float64Array(n1);
  for (let i = 0; i < y.length; i++) {
    for (let j = 0; j < d; j++) row[j] = x[i * d + j];
    row[d] = 1;
    for (let a = 0; a < n1; a++) {
      const ra = row[a];
      for (let b = 0; b < n1; b++) xtx[a * n1 + b] += ra * row[b];
      xty[a * V + y[i]] += ra;
    }
  }
  let diag = 0;
  for (let j = 0; j < d; j++) diag += xtx[j * n1 + j] / d;
  const ridge = (options.ridge ?? 1e-3) * Math.max(diag, 1e-12);
  for (let j = 0; j < n1; j++) xtx[j * n1 + j] += ridge;
  solveSpd(xtx, xty, n1, V);
  const truth = rows.flat();
  let hits = 0;
  for (let i = 0; i < truth.length; i++) {
    let best = 0;
    let bestScore = -Infinity;
    for (let v = 0; v < V; v++) {
      let s = xty[d * V + v];
      for (let j = 0; j < d; j++) s += observed[i * d + j] * xty[j * V + v];
      if (s > bestScore) {
        bestScore = s;
        best = v;
      }
    }
    if (best === truth[i]) hits++;
  }
  return { recovery: truth.length === 0 ? 0 : hits / truth.length, tokens: truth.length };
}
