// Marvell (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022):
// the edge, which knows each example's label, adds Gaussian noise to the per-example g_M whose
// covariance depends on the label, chosen to make the two classes' gradient distributions as
// hard to tell apart as a power budget allows. As in the paper the class-conditional gradients
// are modelled as Gaussians (means estimated per micro-batch, isotropic spreads), the noise of
// class j is Σ_j = u_j ΔΔᵀ/‖Δ‖² + v_j I with Δ the difference of the class means, and the four
// numbers minimise the symmetrised KL divergence between the noised classes under
// p·tr Σ_1 + (1 − p)·tr Σ_0 ≤ s·‖Δ‖². With more than two classes each class is split from the
// rest in turn (one-vs-rest), each split under its own budget s·‖Δ_c‖².
import type { Rng } from '../random.ts';

export interface MarvellSplit {
  /** Extra variance along Δ for the class and for the rest. */
  uIn: number;
  uOut: number;
  /** Extra per-element variance in every direction for the class and for the rest. */
  vIn: number;
  vOut: number;
  /** The symmetrised KL divergence of the noised classes (the objective), before and after. */
  klBefore: number;
  klAfter: number;
}

export interface SplitStatistics {
  /** ‖Δ‖², the squared distance of the class means. */
  delta2: number;
  /** Elements per example. */
  dim: number;
  /** The class's share of the micro-batch. */
  p: number;
  /** Per-element variance of the class's gradients around their mean, and of the rest's. */
  sIn: number;
  sOut: number;
  /** The power budget: the most trace of noise covariance, averaged over examples. */
  power: number;
}

/** Symmetrised KL of N(m1, C1) and N(m0, C0) with C_j = a_j along Δ and b_j in the other dim − 1 directions. */
function symmetricKl(a1: number, a0: number, b1: number, b0: number, delta2: number, dim: number): number {
  const ratio = (x: number, y: number) => x / y + y / x - 2;
  return 0.5 * (ratio(a1, a0) + (dim - 1) * ratio(b1, b0) + delta2 * (1 / a0 + 1 / a1));
}

const FLOOR = 1e-30;

/**
 * The reduced Marvell problem of one split, solved by search: part of the budget evens out the
 * two classes' spreads (added to the narrower one), the rest goes along Δ, split between them.
 */
export function solveMarvellSplit(st: SplitStatistics): MarvellSplit {
  const { delta2, dim, p, power } = st;
  const sIn = Math.max(st.sIn, FLOOR);
  const sOut = Math.max(st.sOut, FLOOR);
  const klBefore = symmetricKl(sIn, sOut, sIn, sOut, delta2, dim);
  let best: MarvellSplit = { uIn: 0, uOut: 0, vIn: 0, vOut: 0, klBefore, klAfter: klBefore };
  if (!(power > 0) || !(p > 0 && p < 1)) return best;
  const inNarrower = sIn < sOut;
  const share = inNarrower ? p : 1 - p;
  const gap = Math.abs(sIn - sOut);
  for (let k = 0; k <= 20; k++) {
    const v = (gap * k) / 20;
    const rest = power - share * (dim - 1) * v;
    if (rest < 0) break;
    for (let w = 0; w <= 40; w++) {
      const uIn = ((w / 40) * rest) / p;
      const uOut = ((1 - w / 40) * rest) / (1 - p);
      const vIn = inNarrower ? v : 0;
      const vOut = inNarrower ? 0 : v;
      const kl = symmetricKl(sIn + vIn + uIn, sOut + vOut + uOut, sIn + vIn, sOut + vOut, delta2, dim);
      if (kl < best.klAfter) best = { uIn, uOut, vIn, vOut, klBefore, klAfter: kl };
    }
  }
  return best;
}

/** The class of each label row: its label tokens (positions ≥ 0) in order; rows with the same label tokens share a class. */
export function labelClasses(labels: readonly (readonly number[])[]): string[] {
  return labels.map((row) => row.filter((t) => t >= 0).join(','));
}

/** Marvell noise on g (flat, `rowSize` elements per example, one class per example), in place. */
export function marvellInPlace(g: Float32Array, rowSize: number, classes: readonly string[], scale: number, rng: Rng): void {
  const rows = g.length / rowSize;
  const names = [...new Set(classes)];
  // Rows that share no label with another (plain text: every row its own label tokens) have no
  // class structure in this micro-batch to hide; noising them would only cost utility.
  if (names.length < 2 || names.length === rows || classes.length !== rows) return;
  // Every split is estimated on the gradients as they came; the noise goes into g.
  const src = Float32Array.from(g);
  const mean = (members: number[]): Float64Array => {
    const m = new Float64Array(rowSize);
    for (const r of members) for (let j = 0; j < rowSize; j++) m[j] += src[r * rowSize + j] / members.length;
    return m;
  };
  const spread = (members: number[], m: Float64Array): number => {
    let s = 0;
    for (const r of members) for (let j = 0; j < rowSize; j++) s += (src[r * rowSize + j] - m[j]) ** 2;
    return members.length > 1 ? s / ((members.length - 1) * rowSize) : Number.NaN;
  };
  const isotropic = new Float64Array(rows);
  const splits = names.length === 2 ? names.slice(0, 1) : names;
  const byClass = new Map(names.map((c) => [c, classes.flatMap((k, i) => (k === c ? [i] : []))]));
  let pooled = 0;
  let pooledCount = 0;
  for (const members of byClass.values()) {
    if (members.length < 2) continue;
    pooled += spread(members, mean(members)) * (members.length - 1);
    pooledCount += members.length - 1;
  }
  const fallback = pooledCount > 0 ? pooled / pooledCount : 0;
  for (const c of splits) {
    const inside = byClass.get(c) ?? [];
    const outside = classes.flatMap((k, i) => (k === c ? [] : [i]));
    const mIn = mean(inside);
    const mOut = mean(outside);
    const delta = new Float64Array(rowSize);
    let delta2 = 0;
    for (let j = 0; j < rowSize; j++) {
      delta[j] = mIn[j] - mOut[j];
      delta2 += delta[j] ** 2;
    }
    if (!(delta2 > 0)) continue;
    const sIn = spread(inside, mIn);
    const sOut = spread(outside, mOut);
    const split = solveMarvellSplit({
      delta2,
      dim: rowSize,
      p: inside.length / rows,
      sIn: Number.isNaN(sIn) ? fallback : sIn,
      sOut: Number.isNaN(sOut) ? fallback : sOut,
      power: scale * delta2,
    });
    const unit = 1 / Math.sqrt(delta2);
    for (let r = 0; r < rows; r++) {
      const isIn = classes[r] === c;
      const u = isIn ? split.uIn : split.uOut;
      isotropic[r] += isIn ? split.vIn : split.vOut;
      if (u <= 0) continue;
      const along = Math.sqrt(u) * rng.normal() * unit;
      for (let j = 0; j < rowSize; j++) g[r * rowSize + j] += along * delta[j];
    }
  }
  for (let r = 0; r < rows; r++) {
    const std = Math.sqrt(isotropic[r]);
    if (std > 0) for (let j = 0; j < rowSize; j++) g[r * rowSize + j] += std * rng.normal();
  }
}
