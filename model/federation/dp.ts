// Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each owner's update is
// clipped to L2 norm C, Gaussian noise N(0, (σC)²) goes on the sum (centrally, or split across
// the owners as N(0, (σC)²/m) each so that the cloud under SecAgg never sees a noiseless sum),
// and an RDP accountant of the sampled Gaussian mechanism (Mironov et al. 2019) reports (ε, δ).
import { randomBytes } from 'node:crypto';
import { FederationError } from './errors.ts';
import { l2Norm } from './tensors.ts';

/** Scales the update down to L2 norm at most `clip` (in place); returns the norm before clipping. */
export function clipUpdate(update: Float32Array, clip: number): number {
  if (!(clip > 0) || !Number.isFinite(clip)) throw new FederationError('TANDEM_FED_DP_INVALID', `clip norm must be a positive number, got ${clip}`, { field: 'clipNorm' });
  const norm = l2Norm(update);
  if (norm > clip) {
    const s = clip / norm;
    for (let i = 0; i < update.length; i++) update[i] *= s;
  }
  return norm;
}

/** Standard normal samples from the OS CSPRNG (Box–Muller on 53-bit uniforms). */
export function gaussian(n: number): Float64Array {
  const out = new Float64Array(n);
  const words = 2 * Math.ceil(n / 2);
  const bytes = randomBytes(words * 8);
  for (let i = 0; i < words; i += 2) {
    const u1 = (bytes.readUInt32LE(i * 8) * 2 ** 21 + (bytes.readUInt32LE(i * 8 + 4) >>> 11) + 1) / (2 ** 53 + 1);
    const u2 = (bytes.readUInt32LE(i * 8 + 8) * 2 ** 21 + (bytes.readUInt32LE(i * 8 + 12) >>> 11)) / 2 ** 53;
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

/** Adds N(0, std²) to every value, in place. */
export function addGaussianNoise(values: Float32Array, std: number): void {
  if (!(std >= 0) || !Number.isFinite(std)) throw new FederationError('TANDEM_FED_DP_INVALID', `noise std must be a non-negative number, got ${std}`, { field: 'noise' });
  if (std === 0) return;
  const z = gaussian(values.length);
  for (let i = 0; i < values.length; i++) values[i] += std * z[i];
}

/** The std each of `owners` owners adds so that the sum carries N(0, (σC)²). */
export function splitNoiseStd(noiseMultiplier: number, clip: number, owners: number): number {
  return (noiseMultiplier * clip) / Math.sqrt(owners);
}

// ---------- RDP accountant of the sampled Gaussian mechanism ----------

/** Opacus' default orders: 1.1..10.9 by 0.1, then 12..63. */
export const DEFAULT_RDP_ORDERS: readonly number[] = [...Array.from({ length: 99 }, (_, x) => 1 + (x + 1) / 10), ...Array.from({ length: 52 }, (_, x) => 12 + x)];

function logAdd(x: number, y: number): number {
  const a = Math.min(x, y);
  const b = Math.max(x, y);
  if (a === -Infinity) return b;
  return Math.log1p(Math.exp(a - b)) + b;
}

function logSub(x: number, y: number): number {
  if (y === -Infinity) return x;
  if (x <= y) return -Infinity;
  return Math.log(Math.expm1(x - y)) + y;
}

/** log(erfc(x)), accurate in the far tail (Numerical Recipes' erfcc: relative error < 1.2e-7). */
export function logErfc(x: number): number {
  const z = Math.abs(x);
  const t = 1 / (1 + 0.5 * z);
  const poly =
    -z * z -
    1.26551223 +
    t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
  const logTail = Math.log(t) + poly; // log erfc(|x|)
  return x >= 0 ? logTail : Math.log(2 - Math.exp(logTail));
}

function logAIntegerOrder(q: number, sigma: number, alpha: number): number {
  let logA = -Infinity;
  let logBinom = 0;
  for (let i = 0; i <= alpha; i++) {
    if (i > 0) logBinom += Math.log(alpha - i + 1) - Math.log(i);
    const s = logBinom + i * Math.log(q) + (alpha - i) * Math.log(1 - q) + (i * i - i) / (2 * sigma * sigma);
    logA = logAdd(logA, s);
  }
  return logA;
}

function logAFractionalOrder(q: number, sigma: number, alpha: number): number {
  let logA0 = -Infinity;
  let logA1 = -Infinity;
  const z0 = sigma * sigma * Math.log(1 / q - 1) + 0.5;
  let logAbsCoef = 0;
  let coefSign = 1;
  for (let i = 0; ; i++) {
    if (i > 0) {
      const f = (alpha - i + 1) / i;
      logAbsCoef += Math.log(Math.abs(f));
      if (f < 0) coefSign = -coefSign;
    }
    const j = alpha - i;
    const logT0 = logAbsCoef + i * Math.log(q) + j * Math.log(1 - q);
    const logT1 = logAbsCoef + j * Math.log(q) + i * Math.log(1 - q);
    const logE0 = Math.log(0.5) + logErfc((i - z0) / (Math.SQRT2 * sigma));
    const logE1 = Math.log(0.5) + logErfc((z0 - j) / (Math.SQRT2 * sigma));
    const logS0 = logT0 + (i * i - i) / (2 * sigma * sigma) + logE0;
    const logS1 = logT1 + (j * j - j) / (2 * sigma * sigma) + logE1;
    if (coefSign > 0) {
      logA0 = logAdd(logA0, logS0);
      logA1 = logAdd(logA1, logS1);
    } else {
      logA0 = logSub(logA0, logS0);
      logA1 = logSub(logA1, logS1);
    }
    if (Math.max(logS0, logS1) < -30 || i > 10_000) break;
  }
  return logAdd(logA0, logA1);
}

/** RDP at order α of one step of the Gaussian mechanism with noise multiplier σ, Poisson sampling rate q. */
export function sampledGaussianRdp(q: number, sigma: number, alpha: number): number {
  if (q === 0) return 0;
  if (sigma === 0) return Infinity;
  if (q === 1) return alpha / (2 * sigma * sigma);
  const logA = Number.isInteger(alpha) ? logAIntegerOrder(q, sigma, alpha) : logAFractionalOrder(q, sigma, alpha);
  return logA / (alpha - 1);
}

/** (ε, δ) from RDP values by the conversion of Balle et al. 2020 (Theorem 21), as Opacus does. */
export function epsilonFromRdp(orders: readonly number[], rdp: readonly number[], delta: number): { epsilon: number; order: number } {
  let best = Infinity;
  let order = NaN;
  orders.forEach((a, i) => {
    const eps = rdp[i] - (Math.log(delta) + Math.log(a)) / (a - 1) + Math.log((a - 1) / a);
    if (eps < best) {
      best = eps;
      order = a;
    }
  });
  return { epsilon: Math.max(best, 0), order };
}

export interface PrivacySpent {
  epsilon: number;
  delta: number;
  order: number;
}

export interface AccountantState {
  /** (noise multiplier, sampling rate, rounds) in the order they were spent. */
  steps: [number, number, number][];
}

/** Composes sampled Gaussian rounds; refuses a round that would push ε over the budget. */
export class RdpAccountant {
  private readonly orders: readonly number[];
  private rdp: number[];
  readonly steps: [number, number, number][] = [];

  constructor(state: AccountantState = { steps: [] }, orders: readonly number[] = DEFAULT_RDP_ORDERS) {
    this.orders = orders;
    this.rdp = orders.map(() => 0);
    for (const [sigma, q, n] of state.steps) this.compose(sigma, q, n);
  }

  static check(noiseMultiplier: number, sampleRate: number): void {
    if (!(noiseMultiplier > 0) || !Number.isFinite(noiseMultiplier) || noiseMultiplier > 1000) throw new FederationError('TANDEM_FED_DP_INVALID', `noise multiplier must be in (0, 1000], got ${noiseMultiplier}`, { field: 'noiseMultiplier' });
    if (!(sampleRate > 0 && sampleRate <= 1)) throw new FederationError('TANDEM_FED_DP_INVALID', `sampling rate must be in (0, 1], got ${sampleRate}`, { field: 'sampleRate' });
  }

  private rdpAfter(noiseMultiplier: number, sampleRate: number, rounds: number): number[] {
    return this.orders.map((a, i) => this.rdp[i] + rounds * sampledGaussianRdp(sampleRate, noiseMultiplier, a));
  }

  compose(noiseMultiplier: number, sampleRate: number, rounds = 1): void {
    RdpAccountant.check(noiseMultiplier, sampleRate);
    this.rdp = this.rdpAfter(noiseMultiplier, sampleRate, rounds);
    const last = this.steps.at(-1);
    if (last && last[0] === noiseMultiplier && last[1] === sampleRate) last[2] += rounds;
    else this.steps.push([noiseMultiplier, sampleRate, rounds]);
  }

  spent(delta: number): PrivacySpent {
    checkDelta(delta);
    if (this.steps.length === 0) return { epsilon: 0, delta, order: NaN };
    return { ...epsilonFromRdp(this.orders, this.rdp, delta), delta };
  }

  /** ε after one more round, without spending it. */
  preview(noiseMultiplier: number, sampleRate: number, delta: number): PrivacySpent {
    RdpAccountant.check(noiseMultiplier, sampleRate);
    checkDelta(delta);
    return { ...epsilonFromRdp(this.orders, this.rdpAfter(noiseMultiplier, sampleRate, 1), delta), delta };
  }

  /** Spends one round, or throws TANDEM_FED_DP_BUDGET_EXCEEDED and spends nothing. */
  spendRound(noiseMultiplier: number, sampleRate: number, delta: number, epsilonBudget: number): PrivacySpent {
    const next = this.preview(noiseMultiplier, sampleRate, delta);
    if (next.epsilon > epsilonBudget) {
      throw new FederationError('TANDEM_FED_DP_BUDGET_EXCEEDED', `the round would bring ε to ${next.epsilon.toFixed(3)}, over the budget ${epsilonBudget}`, { field: 'epsilon', details: { epsilon: next.epsilon, budget: epsilonBudget } });
    }
    this.compose(noiseMultiplier, sampleRate, 1);
    return next;
  }

  state(): AccountantState {
    return { steps: this.steps.map((s) => [...s] as [number, number, number]) };
  }
}

function checkDelta(delta: number): void {
  if (!(delta > 0 && delta < 1)) throw new FederationError('TANDEM_FED_DP_INVALID', `delta must be in (0, 1), got ${delta}`, { field: 'delta' });
}
