// LoRA-aware aggregation. Averaging A and B separately is not the average of the products
// B·A, so two alternatives: FFA-LoRA (A frozen at its shared initialisation, only B averaged:
// then mean(B)·A is exactly mean(B·A)) and exact aggregation of ΔW = B·A, refactored to rank r
// by a truncated SVD (subspace iteration) of the averaged product.
import { symmetricEigen } from '../linalg.ts';
import { fedAvg } from './aggregate.ts';
import type { WeightedUpdate } from './aggregate.ts';
import { FederationError } from './errors.ts';
import { flatten, unflatten } from './tensors.ts';
import type { Layout, TensorSet } from './tensors.ts';

const A_SUFFIX = 'lora_A.weight';
const B_SUFFIX = 'lora_B.weight';

export interface LoraPair {
  a: string;
  b: string;
}

/** The LoRA (A, B) key pairs of an adapter, by PEFT's key names. */
export function loraPairs(keys: Iterable<string>): LoraPair[] {
  const set = new Set(keys);
  const pairs: LoraPair[] = [];
  for (const k of [...set].sort()) {
    if (!k.endsWith(A_SUFFIX)) continue;
    const b = k.slice(0, -A_SUFFIX.length) + B_SUFFIX;
    if (set.has(b)) pairs.push({ a: k, b });
  }
  return pairs;
}

/** Whether FFA-LoRA aggregates a key (everything but lora_A). */
export function ffaAggregates(key: string): boolean {
  return !key.endsWith(A_SUFFIX);
}

export interface WeightedAdapter {
  tensors: TensorSet;
  weight: number;
}

function matmul(a: Float64Array, b: Float64Array, n: number, k: number, m: number): Float64Array {
  // [n,k]·[k,m]
  const out = new Float64Array(n * m);
  for (let i = 0; i < n; i++) {
    for (let p = 0; p < k; p++) {
      const av = a[i * k + p];
      if (av === 0) continue;
      for (let j = 0; j < m; j++) out[i * m + j] += av * b[p * m + j];
    }
  }
  return out;
}

function transpose(a: Float64Array, n: number, m: number): Float64Array {
  const out = new Float64Array(n * m);
  for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) out[j * n + i] = a[i * m + j];
  return out;
}

/**
 * Gram-Schmidt (twice, for stability) on the columns of an [n, r] matrix, in place. A column
 * that is numerically in the span of the previous ones is zeroed, not normalised: a rank-
 * deficient M would otherwise turn rounding noise into non-orthogonal directions.
 */
function orthonormalizeColumns(q: Float64Array, n: number, r: number): void {
  for (let j = 0; j < r; j++) {
    let before = 0;
    for (let i = 0; i < n; i++) before += q[i * r + j] ** 2;
    for (let pass = 0; pass < 2; pass++) {
      for (let p = 0; p < j; p++) {
        let d = 0;
        for (let i = 0; i < n; i++) d += q[i * r + j] * q[i * r + p];
        for (let i = 0; i < n; i++) q[i * r + j] -= d * q[i * r + p];
      }
    }
    let s = 0;
    for (let i = 0; i < n; i++) s += q[i * r + j] ** 2;
    const zero = s <= 1e-20 * before || s < 1e-300;
    s = Math.sqrt(s);
    for (let i = 0; i < n; i++) q[i * r + j] = zero ? 0 : q[i * r + j] / s;
  }
}

/**
 * Rank-r factors of an [out, in] matrix M ≈ B·A with B = U·√S [out, r] and A = √S·Vᵀ [r, in],
 * by subspace iteration (deterministic start) and an SVD of the small projected matrix.
 */
export function truncatedFactors(m: Float64Array, out: number, inn: number, rank: number, iterations = 30): { b: Float32Array; a: Float32Array; singularValues: number[] } {
  const k = Math.min(rank + 4, out, inn);
  // Deterministic start (a fixed pseudo-random matrix) so every run refactors the same way.
  let seed = 0x9e3779b9;
  const omega = new Float64Array(inn * k);
  for (let i = 0; i < omega.length; i++) {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    omega[i] = seed / 2 ** 32 - 0.5;
  }
  const mt = transpose(m, out, inn);
  let q = matmul(m, omega, out, inn, k);
  orthonormalizeColumns(q, out, k);
  for (let it = 0; it < iterations; it++) {
    const z = matmul(mt, q, inn, out, k);
    orthonormalizeColumns(z, inn, k);
    q = matmul(m, z, out, inn, k);
    orthonormalizeColumns(q, out, k);
  }
  const small = matmul(transpose(q, out, k), m, k, out, inn); // [k, in]
  const gram = matmul(small, transpose(small, k, inn), k, inn, k); // [k, k]
  const { values, vectors } = symmetricEigen(gram, k);
  const r = Math.min(rank, k);
  const b = new Float32Array(out * rank);
  const a = new Float32Array(rank * inn);
  const singularValues: number[] = [];
  const uSmallT = transpose(vectors, k, k);
  const vt = matmul(uSmallT, small, k, k, inn); // rows: σ_j v_jᵀ
  const u = matmul(q, vectors, out, k, k); // [out, k]
  for (let j = 0; j < r; j++) {
    const sigma = Math.sqrt(Math.max(values[j], 0));
    singularValues.push(sigma);
    if (sigma < 1e-300) continue;
    const root = Math.sqrt(sigma);
    for (let i = 0; i < out; i++) b[i * rank + j] = u[i * k + j] * root;
    for (let c = 0; c < inn; c++) a[j * inn + c] = (vt[j * inn + c] / sigma) * root;
  }
  return { b, a, singularValues };
}

/** Σ w_k B_k·A_k / Σ w_k for one LoRA pair, float64, [out, in]. */
export function averagedProduct(adapters: readonly WeightedAdapter[], pair: LoraPair): { m: Float64Array; out: number; inn: number; rank: number } {
  const first = adapters[0].tensors;
  const [rank, inn] = first[pair.a].shape;
  const [out] = first[pair.b].shape;
  const m = new Float64Array(out * inn);
  let total = 0;
  for (const { tensors, weight } of adapters) {
    const a = tensors[pair.a];
    const b = tensors[pair.b];
    if (!a || !b || a.shape[0] !== rank || a.shape[1] !== inn || b.shape[0] !== out || b.shape[1] !== rank) {
      throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `LoRA pair ${pair.a} does not have shapes [${rank}, ${inn}] and [${out}, ${rank}]`, { field: pair.a });
    }
    total += weight;
    const prod = matmul(Float64Array.from(b.data), Float64Array.from(a.data), out, rank, inn);
    for (let i = 0; i < m.length; i++) m[i] += weight * prod[i];
  }
  for (let i = 0; i < m.length; i++) m[i] /= total;
  return { m, out, inn, rank };
}

export interface ExactLoraResult {
  tensors: TensorSet;
  /** Per LoRA pair: ‖mean(BA) − B'A'‖_F / ‖mean(BA)‖_F, the loss of the rank-r refactoring. */
  refactorError: Record<string, number>;
  /** Per LoRA pair: ‖mean(BA) − mean(B)·mean(A)‖_F / ‖mean(BA)‖_F, how far naive averaging is. */
  naiveError: Record<string, number>;
}

function frobenius(x: Float64Array): number {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s);
}

/**
 * Exact aggregation of LoRA products: for every (A, B) pair the weighted mean of B·A is
 * refactored to rank r; every other tensor is averaged (weighted) as in FedAvg.
 */
export function exactLoraAggregate(adapters: readonly WeightedAdapter[]): ExactLoraResult {
  if (adapters.length === 0) throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', 'no adapters to aggregate', { field: 'updates' });
  const keys = Object.keys(adapters[0].tensors);
  const pairs = loraPairs(keys);
  const inPair = new Set(pairs.flatMap((p) => [p.a, p.b]));
  const total = adapters.reduce((s, x) => s + x.weight, 0);
  const tensors: TensorSet = {};
  for (const key of keys) {
    if (inPair.has(key)) continue;
    const shape = adapters[0].tensors[key].shape;
    const acc = new Float64Array(adapters[0].tensors[key].data.length);
    for (const { tensors: t, weight } of adapters) {
      if (!t[key] || t[key].data.length !== acc.length) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `tensor ${key} is missing or has the wrong size`, { field: key });
      for (let i = 0; i < acc.length; i++) acc[i] += weight * t[key].data[i];
    }
    tensors[key] = { shape: [...shape], data: Float32Array.from(acc, (v) => v / total) };
  }
  const refactorError: Record<string, number> = {};
  const naiveError: Record<string, number> = {};
  for (const pair of pairs) {
    const { m, out, inn, rank } = averagedProduct(adapters, pair);
    const { a, b } = truncatedFactors(m, out, inn, rank);
    tensors[pair.a] = { shape: [rank, inn], data: a };
    tensors[pair.b] = { shape: [out, rank], data: b };
    const norm = frobenius(m) || 1;
    const approx = matmul(Float64Array.from(b), Float64Array.from(a), out, rank, inn);
    refactorError[pair.a] = frobenius(m.map((v, i) => v - approx[i])) / norm;
    const meanA = new Float64Array(rank * inn);
    const meanB = new Float64Array(out * rank);
    for (const { tensors: t, weight } of adapters) {
      t[pair.a].data.forEach((v, i) => (meanA[i] += (weight * v) / total));
      t[pair.b].data.forEach((v, i) => (meanB[i] += (weight * v) / total));
    }
    const naive = matmul(meanB, meanA, out, rank, inn);
    naiveError[pair.a] = frobenius(m.map((v, i) => v - naive[i])) / norm;
  }
  return { tensors, refactorError, naiveError };
}

/** Zeroes the LoRA A entries of a flat vector in `layout` (FFA-LoRA: A stays frozen). */
export function zeroLoraA(values: Float32Array, layout: Layout): Float32Array {
  let o = 0;
  layout.keys.forEach((key, i) => {
    const n = layout.shapes[i].reduce((a, b) => a * b, 1);
    if (!ffaAggregates(key)) values.fill(0, o, o + n);
    o += n;
  });
  return values;
}

export interface LoraAwareDelta {
  /** The new global adapter minus the old one, flat in `layout`. */
  delta: Float32Array;
  /** exact-product only: the largest refactoring error and naive-averaging error over the LoRA pairs. */
  lora?: { refactorError: number; naiveError: number };
}

/**
 * The round's aggregate of owners' deltas from `global` under a LoRA-aware aggregation:
 * ffa-lora averages (by examples) everything but the A matrices, which stay as they are;
 * exact-product averages every owner's B·A (global + delta) and refactors it to rank r.
 */
export function loraAwareDelta(kind: 'ffa-lora' | 'exact-product', global: Float32Array, updates: readonly WeightedUpdate[], layout: Layout): LoraAwareDelta {
  if (kind === 'ffa-lora') return { delta: zeroLoraA(fedAvg(updates), layout) };
  const adapters = updates.map((u) => ({ tensors: unflatten(u.values.map((v, i) => global[i] + v), layout), weight: u.weight }));
  const exact = exactLoraAggregate(adapters);
  const next = flatten(exact.tensors, layout);
  const max = (r: Record<string, number>): number => Object.values(r).reduce((m, v) => Math.max(m, v), 0);
  return { delta: next.map((v, i) => v - global[i]), lora: { refactorError: max(exact.refactorError), naiveError: max(exact.naiveError) } };
}
