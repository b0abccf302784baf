// Defenses an edge applies before anything leaves it, chosen per session:
//   noise          DP-Forward style: each token's h_B clipped to L2 norm C, then Gaussian noise
//                  with a stated per-element standard deviation sigma·C/√d (noise norm ≈ sigma·C);
//                  `noise-spread` shapes it per dimension to h_B's spread at the same RMS std.
//                  The middle is residual, so the edge takes its own perturbation back out of
//                  the h_M it receives (DefendedMiddle): only the middle's blocks see the noise;
//   deeper-bottom  K more blocks on the edge (the cut moves; nothing is added to the tensors);
//   max-norm       Li et al.'s label defense: each example's g_M gets isotropic noise that
//                  brings its expected squared norm to the largest in the micro-batch;
//   gradient-noise isotropic noise on each example's g_M of norm ≈ rho·(largest example norm),
//                  which hides its direction;
//   nopeek         NoPeek: alpha·dCor(token embeddings, h_B) added to the edge's loss (training only);
//   marvell        Li et al.'s optimized label noise on g_M (marvell.ts) under a power budget of
//                  s·‖difference of the class means‖² (needs the micro-batch's labels, which the edge has).
// A list of these is what the edge offers in Hello; an unknown name is refused.
import { tf } from '../backend.ts';
import type { Rng } from '../random.ts';
import { PrivacyError } from './errors.ts';
import { marvellInPlace } from './marvell.ts';

export const DEFENSE_NAMES = ['noise', 'deeper-bottom', 'max-norm', 'gradient-noise', 'nopeek', 'marvell'] as const;
export type DefenseName = (typeof DEFENSE_NAMES)[number];

/**
 * Noise on h_B. `clip` 0 and `spread` without `scales` are fixed by the edge from its first h_B.
 * `restore` (default on) takes the edge's own perturbation back out of the h_M it receives.
 */
export interface HiddenNoise {
  sigma: number;
  clip: number;
  /** Shape the noise per dimension to the spread of h_B (its standard deviation over tokens), at the same total power. */
  spread?: boolean;
  /** The per-dimension multipliers of the stated std (RMS 1), fixed from the first h_B when `spread`. */
  scales?: number[];
  restore?: boolean;
}

export interface Defenses {
  /** Noise on h_B: per-token clip norm and the noise multiplier. */
  noise?: HiddenNoise;
  /** Extra blocks moved from the middle to the edge's bottom. */
  deeperBottom?: number;
  maxNorm?: boolean;
  /** Noise on g_M relative to the largest example norm of the micro-batch. */
  gradientNoise?: { rho: number };
  /** NoPeek: the weight of the distance-correlation term in the edge's loss. */
  nopeek?: { weight: number };
  /** Marvell: the noise power relative to the squared distance of the class means of g_M. */
  marvell?: { scale: number };
}

/** The bottom `auto` moves the cut to when the model has the blocks: deeper bottoms cost edge compute, not loss. */
export const AUTO_BOTTOM = 3;

/**
 * The defaults of `auto` where the model and cut are not known yet (`tandem edge train`): the
 * bottom two blocks deeper (the default cut B = 1 to AUTO_BOTTOM), noise on h_B at σ = 0.7
 * (taken back out of h_M by the edge) and Marvell at power 2; model/privacy/README.md has the
 * measurements. Where the cut is known, `autoDefenses` fits the deeper bottom to the model.
 */
export const AUTO_DEFENSES: Readonly<Defenses> = { deeperBottom: AUTO_BOTTOM - 1, noise: { sigma: 0.7, clip: 0 }, marvell: { scale: 2 } };

/**
 * `--defense auto` for a model of `layers` blocks and an asked cut: AUTO_DEFENSES with the
 * bottom moved to AUTO_BOTTOM blocks where that leaves the middle at least one block (no
 * deeper bottom where the asked one is as deep already or the model has no block to spare).
 */
export function autoDefenses(layers: number, cut: { bottom: number; top: number }): Defenses {
  const { deeperBottom: _, ...rest } = structuredClone(AUTO_DEFENSES) as Defenses;
  const deeper = Math.min(AUTO_BOTTOM, layers - cut.top - 1) - cut.bottom;
  return { ...rest, ...(deeper > 0 ? { deeperBottom: deeper } : {}) };
}

export const DEFENSE_LIMITS = { sigma: 100, clip: 1e6, deeperBottom: 64, rho: 100, nopeek: 100, marvell: 100, hidden: 65_536 } as const;

function positive(value: number, field: string, max: number): number {
  if (!Number.isFinite(value) || value <= 0 || value > max) {
    throw new PrivacyError('TANDEM_DEFENSE_INVALID', `${field} must be a number in (0, ${max}], got ${value}`, { field, details: { limit: max } });
  }
  return value;
}

function param(raw: string | undefined, field: string, max: number, fallback: number): number {
  if (raw === undefined || raw === '') return fallback;
  if (!/^[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?$/i.test(raw)) throw new PrivacyError('TANDEM_DEFENSE_INVALID', `${field} must be a number, got "${raw.slice(0, 40)}"`, { field });
  return positive(Number(raw), field, max);
}

/** Checks a Defenses record (from a flag, a file or the wire): every value in range. */
export function checkDefenses(d: Defenses): Defenses {
  if (d.noise) {
    positive(d.noise.sigma, 'defense.noise.sigma', DEFENSE_LIMITS.sigma);
    if (!(Number.isFinite(d.noise.clip) && d.noise.clip >= 0 && d.noise.clip <= DEFENSE_LIMITS.clip)) {
      throw new PrivacyError('TANDEM_DEFENSE_INVALID', `defense.noise.clip must be in [0, ${DEFENSE_LIMITS.clip}] (0: measured from the data), got ${d.noise.clip}`, { field: 'defense.noise.clip' });
    }
    const scales = d.noise.scales;
    if (scales !== undefined && (!Array.isArray(scales) || scales.length > DEFENSE_LIMITS.hidden || scales.some((x) => !Number.isFinite(x) || x < 0 || x > DEFENSE_LIMITS.sigma))) {
      throw new PrivacyError('TANDEM_DEFENSE_INVALID', `defense.noise.scales must be at most ${DEFENSE_LIMITS.hidden} numbers in [0, ${DEFENSE_LIMITS.sigma}]`, { field: 'defense.noise.scales', details: { limit: DEFENSE_LIMITS.hidden } });
    }
  }
  if (d.deeperBottom !== undefined && (!Number.isInteger(d.deeperBottom) || d.deeperBottom < 1 || d.deeperBottom > DEFENSE_LIMITS.deeperBottom)) {
    throw new PrivacyError('TANDEM_DEFENSE_INVALID', `defense.deeper-bottom must be an integer in [1, ${DEFENSE_LIMITS.deeperBottom}], got ${d.deeperBottom}`, { field: 'defense.deeper-bottom' });
  }
  if (d.gradientNoise) positive(d.gradientNoise.rho, 'defense.gradient-noise.rho', DEFENSE_LIMITS.rho);
  if (d.nopeek) positive(d.nopeek.weight, 'defense.nopeek', DEFENSE_LIMITS.nopeek);
  if (d.marvell) positive(d.marvell.scale, 'defense.marvell', DEFENSE_LIMITS.marvell);
  return d;
}

/**
 * Parses `--defense` text: `none`, `auto`, or a comma list of `noise[:SIGMA[:CLIP]]`,
 * `noise-spread[:SIGMA[:CLIP]]` (the noise shaped to h_B's spread per dimension; offered as `noise`),
 * `deeper-bottom[:K]`, `max-norm`, `gradient-noise[:RHO]`, `nopeek[:ALPHA]`, `marvell[:S]`. Unknown names are a typed error.
 */
export function parseDefenses(text: string): Defenses | 'auto' {
  const items = text.split(',').map((s) => s.trim()).filter((s) => s !== '');
  if (items.length === 0 || (items.length === 1 && items[0] === 'none')) return {};
  if (items.length === 1 && items[0] === 'auto') return 'auto';
  const out: Defenses = {};
  for (const item of items) {
    const [name, a, b, ...rest] = item.split(':');
    if (rest.length > 0) throw new PrivacyError('TANDEM_DEFENSE_INVALID', `too many parameters in "${item.slice(0, 40)}"`, { field: 'defense' });
    switch (name) {
      case 'noise':
      case 'noise-spread':
        out.noise = { sigma: param(a, 'defense.noise.sigma', DEFENSE_LIMITS.sigma, 1), clip: b === undefined ? 0 : param(b, 'defense.noise.clip', DEFENSE_LIMITS.clip, 0), ...(name === 'noise-spread' ? { spread: true } : {}) };
        break;
      case 'deeper-bottom': {
        const k = param(a, 'defense.deeper-bottom', DEFENSE_LIMITS.deeperBottom, 1);
        out.deeperBottom = k;
        break;
      }
      case 'max-norm':
        if (a !== undefined) throw new PrivacyError('TANDEM_DEFENSE_INVALID', 'max-norm takes no parameter', { field: 'defense.max-norm' });
        out.maxNorm = true;
        break;
      case 'gradient-noise':
        out.gradientNoise = { rho: param(a, 'defense.gradient-noise.rho', DEFENSE_LIMITS.rho, 1) };
        break;
      case 'nopeek':
        out.nopeek = { weight: param(a, 'defense.nopeek', DEFENSE_LIMITS.nopeek, 0.1) };
        break;
      case 'marvell':
        out.marvell = { scale: param(a, 'defense.marvell', DEFENSE_LIMITS.marvell, 1) };
        break;
      default:
        throw new PrivacyError('TANDEM_DEFENSE_UNKNOWN', `unknown defense "${name.slice(0, 40)}"; known: none, auto, noise-spread, ${DEFENSE_NAMES.join(', ')}`, { field: 'defense', details: { known: DEFENSE_NAMES } });
    }
  }
  return checkDefenses(out);
}

/** The names a Defenses record turns on, as offered in Hello. */
export function defenseNames(d: Defenses): DefenseName[] {
  const names: DefenseName[] = [];
  if (d.noise) names.push('noise');
  if (d.deeperBottom) names.push('deeper-bottom');
  if (d.maxNorm) names.push('max-norm');
  if (d.gradientNoise) names.push('gradient-noise');
  if (d.nopeek) names.push('nopeek');
  if (d.marvell) names.push('marvell');
  return names;
}

/** One line per defense, for reports. */
export function describeDefenses(d: Defenses): string {
  const parts: string[] = [];
  if (d.noise) parts.push(`${d.noise.spread ? 'noise-spread' : 'noise'}:${d.noise.sigma}${d.noise.clip > 0 ? `:${Number(d.noise.clip.toPrecision(4))}` : ''}${d.noise.restore === false ? ' (not restored)' : ''}`);
  if (d.deeperBottom) parts.push(`deeper-bottom:${d.deeperBottom}`);
  if (d.maxNorm) parts.push('max-norm');
  if (d.gradientNoise) parts.push(`gradient-noise:${d.gradientNoise.rho}`);
  if (d.nopeek) parts.push(`nopeek:${d.nopeek.weight}`);
  if (d.marvell) parts.push(`marvell:${d.marvell.scale}`);
  return parts.length === 0 ? 'none' : parts.join(',');
}

/** The per-element standard deviation the noise defense adds for hidden size d. */
export function hiddenNoiseStd(noise: HiddenNoise, hidden: number): number {
  return (noise.sigma * noise.clip) / Math.sqrt(hidden);
}

/** The median L2 norm of the token vectors of h [.., d]: the clip norm `clip: 0` stands for. */
export function medianTokenNorm(h: Float32Array, hidden: number): number {
  const n = h.length / hidden;
  const norms = new Float64Array(n);
  for (let t = 0; t < n; t++) {
    let s = 0;
    for (let j = 0; j < hidden; j++) s += h[t * hidden + j] ** 2;
    norms[t] = Math.sqrt(s);
  }
  norms.sort();
  return n === 0 ? 0 : norms[Math.floor(n / 2)];
}

/** Per-dimension multipliers proportional to the standard deviation over tokens of h [.., d], scaled to RMS 1. */
export function spreadScales(h: Float32Array, hidden: number): number[] {
  const n = h.length / hidden;
  const mean = new Float64Array(hidden);
  const sq = new Float64Array(hidden);
  for (let t = 0; t < n; t++) {
    for (let j = 0; j < hidden; j++) {
      const x = h[t * hidden + j];
      mean[j] += x / n;
      sq[j] += (x * x) / n;
    }
  }
  const std = Array.from(mean, (m, j) => Math.sqrt(Math.max(sq[j] - m * m, 0)));
  const rms = Math.sqrt(std.reduce((a, x) => a + x * x, 0) / hidden);
  return rms > 0 ? std.map((x) => x / rms) : std.map(() => 1);
}

/** Clips each token vector of h (flat, hidden-size rows) to `clip` and adds N(0, std²) per element, in place. */
export function noiseHiddenInPlace(h: Float32Array, hidden: number, noise: HiddenNoise, rng: Rng): void {
  if (!(noise.clip > 0)) throw new PrivacyError('TANDEM_DEFENSE_INVALID', 'the noise defense needs a clip norm > 0 before it is applied', { field: 'defense.noise.clip' });
  const std = hiddenNoiseStd(noise, hidden);
  const scales = noise.scales;
  if (scales && scales.length !== hidden) throw new PrivacyError('TANDEM_DEFENSE_INVALID', `the noise defense has ${scales.length} per-dimension scales for a hidden size of ${hidden}`, { field: 'defense.noise.scales' });
  for (let t = 0; t < h.length; t += hidden) {
    let s = 0;
    for (let j = 0; j < hidden; j++) s += h[t + j] ** 2;
    const scale = Math.min(1, noise.clip / Math.max(Math.sqrt(s), 1e-30));
    for (let j = 0; j < hidden; j++) h[t + j] = h[t + j] * scale + std * (scales ? scales[j] : 1) * rng.normal();
  }
}

/** True when the defenses perturb g_M. */
export function perturbsGradient(d: Defenses): boolean {
  return Boolean(d.maxNorm || d.gradientNoise || d.marvell);
}

/**
 * The label defenses on g_M [batch, …] flat, `rowSize` elements per example, in place: Marvell
 * (with each example's class; without classes it adds nothing), then max-norm, then
 * gradient-noise, both against the largest example norm of this micro-batch.
 */
export function perturbGradientInPlace(g: Float32Array, rowSize: number, d: Defenses, rng: Rng, classes?: readonly string[]): void {
  if (d.marvell && classes) marvellInPlace(g, rowSize, classes, d.marvell.scale, rng);
  if (!d.maxNorm && !d.gradientNoise) return;
  const rows = g.length / rowSize;
  const sq = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    for (let j = 0; j < rowSize; j++) s += g[r * rowSize + j] ** 2;
    sq[r] = s;
  }
  const max2 = Math.max(...sq);
  for (let r = 0; r < rows; r++) {
    let v = 0; // per-element noise variance for this row
    if (d.maxNorm) v += (max2 - sq[r]) / rowSize;
    if (d.gradientNoise) v += (d.gradientNoise.rho ** 2 * max2) / rowSize;
    const std = Math.sqrt(v);
    if (std === 0) continue;
    for (let j = 0; j < rowSize; j++) g[r * rowSize + j] += std * rng.normal();
  }
}

/** h with the noise defense, as a new tensor (the caller owns both). */
export function noiseHidden(h: tf.Tensor3D, noise: HiddenNoise, rng: Rng): tf.Tensor3D {
  const data = Float32Array.from(h.dataSync());
  noiseHiddenInPlace(data, h.shape[2], noise, rng);
  return tf.tensor3d(data, h.shape);
}

/** g with the label defenses, one example per batch row, as a new tensor. */
export function perturbGradient(g: tf.Tensor3D, d: Defenses, rng: Rng, classes?: readonly string[]): tf.Tensor3D {
  const data = Float32Array.from(g.dataSync());
  perturbGradientInPlace(data, g.shape[1] * g.shape[2], d, rng, classes);
  return tf.tensor3d(data, g.shape);
}
