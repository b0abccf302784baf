// Server-side aggregation of owners' updates (deltas from the global adapter, flat vectors in
// the layout of the global adapter). Sums run in float64 so the order of owners does not matter.
import { FederationError } from './errors.ts';
import { checkFinite, checkSize } from './tensors.ts';

export interface WeightedUpdate {
  /** Delta from the global adapter of the round, flat. */
  values: Float32Array;
  /** Examples the owner trained on in the round (FedAvg's weight). */
  weight: number;
}

export const AGGREGATORS = ['fedavg', 'median', 'trimmed-mean'] as const;
export type AggregatorName = (typeof AGGREGATORS)[number];

function checkUpdates(updates: readonly WeightedUpdate[]): number {
  if (updates.length === 0) throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', 'no updates to aggregate', { field: 'updates' });
  const size = updates[0].values.length;
  updates.forEach((u, i) => {
    checkSize(u.values, size, `updates[${i}]`);
    checkFinite(u.values, `updates[${i}]`);
    if (!Number.isFinite(u.weight) || u.weight <= 0) throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', `updates[${i}].weight must be a positive number, got ${u.weight}`, { field: `updates[${i}].weight` });
  });
  return size;
}

/** Weighted FedAvg: Σ w_i x_i / Σ w_i (McMahan et al.), weights = examples. */
export function fedAvg(updates: readonly WeightedUpdate[]): Float32Array {
  const size = checkUpdates(updates);
  const acc = new Float64Array(size);
  let total = 0;
  for (const u of updates) {
    total += u.weight;
    for (let i = 0; i < size; i++) acc[i] += u.weight * u.values[i];
  }
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) out[i] = acc[i] / total;
  return out;
}

/** Coordinate-wise median (unweighted; robust to a minority of faulty owners). */
export function coordinateMedian(updates: readonly WeightedUpdate[]): Float32Array {
  const size = checkUpdates(updates);
  const n = updates.length;
  const col = new Float64Array(n);
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    for (let k = 0; k < n; k++) col[k] = updates[k].values[i];
    col.sort();
    out[i] = n % 2 === 1 ? col[(n - 1) / 2] : (col[n / 2 - 1] + col[n / 2]) / 2;
  }
  return out;
}

/** Coordinate-wise trimmed mean: drops the ⌊β·n⌋ largest and smallest values of each coordinate. */
export function trimmedMean(updates: readonly WeightedUpdate[], beta: number): Float32Array {
  const size = checkUpdates(updates);
  if (!(beta >= 0 && beta < 0.5)) throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', `trim fraction must be in [0, 0.5), got ${beta}`, { field: 'trimFraction' });
  const n = updates.length;
  const cut = Math.floor(beta * n);
  const col = new Float64Array(n);
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    for (let k = 0; k < n; k++) col[k] = updates[k].values[i];
    col.sort();
    let s = 0;
    for (let k = cut; k < n - cut; k++) s += col[k];
    out[i] = s / (n - 2 * cut);
  }
  return out;
}

export function aggregate(name: AggregatorName, updates: readonly WeightedUpdate[], trimFraction = 0.2): Float32Array {
  switch (name) {
    case 'fedavg':
      return fedAvg(updates);
    case 'median':
      return coordinateMedian(updates);
    case 'trimmed-mean':
      return trimmedMean(updates, trimFraction);
    default:
      throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', `unknown aggregation ${String(name)}; one of ${AGGREGATORS.join(', ')}`, { field: 'aggregation' });
  }
}

export interface FedAdamOptions {
  learningRate: number;
  beta1?: number;
  beta2?: number;
  /** Adaptivity τ (Reddi et al. 2021, "Adaptive Federated Optimization"). */
  tau?: number;
}

export interface FedAdamState {
  m: Float32Array;
  v: Float32Array;
  round: number;
}

/**
 * FedAdam: the averaged delta is a pseudo-gradient; the server applies Adam to it.
 * Returns the delta to add to the global adapter and the new state (the old one is not changed).
 */
export function fedAdamStep(delta: Float32Array, state: FedAdamState | undefined, options: FedAdamOptions): { step: Float32Array; state: FedAdamState } {
  checkFinite(delta, 'delta');
  const { learningRate: lr, beta1 = 0.9, beta2 = 0.99, tau = 1e-3 } = options;
  if (!(lr > 0) || !(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1) || !(tau > 0)) {
    throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', 'FedAdam needs learningRate > 0, beta1 and beta2 in [0, 1), tau > 0', { field: 'fedAdam' });
  }
  const m = state ? Float32Array.from(state.m) : new Float32Array(delta.length);
  const v = state ? Float32Array.from(state.v) : new Float32Array(delta.length).fill(tau * tau);
  if (m.length !== delta.length) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `FedAdam state has ${m.length} values, delta ${delta.length}`, { field: 'delta' });
  const step = new Float32Array(delta.length);
  for (let i = 0; i < delta.length; i++) {
    m[i] = beta1 * m[i] + (1 - beta1) * delta[i];
    v[i] = beta2 * v[i] + (1 - beta2) * delta[i] * delta[i];
    step[i] = (lr * m[i]) / (Math.sqrt(v[i]) + tau);
  }
  return { step, state: { m, v, round: (state?.round ?? 0) + 1 } };
}
