// Uniform layer drop (Offsite-Tuning, Xiao et al. 2023) and the layer numbering of the
// emulated model: bottom blocks, then the kept middle blocks, then the top blocks, numbered
// 0..B+K+T-1, so the emulated model is an ordinary LlamaModel of B+K+T blocks.
import type { CutSpec } from '../model/index.ts';
import { EmulatorError } from './errors.ts';

/** B bottom and T top blocks (model/cut.ts). */
export type Cut = CutSpec;

/** Python's round(): halves go to the even neighbour (the reference implementation rounds so). */
function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * Which of n middle blocks the emulator keeps: round(i·(n−1)/(K−1)) for i in 0..K−1, computed
 * in floating point and rounded as the paper's `uniform_choose_layers` does, so the first and
 * last middle blocks always stay. Indices are relative to the middle (0..n−1).
 */
export function keptMiddleIndices(n: number, keep: number): number[] {
  if (!Number.isInteger(n) || n < 1) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `the cut leaves ${n} middle blocks; the emulator needs at least one`, { field: 'cut' });
  if (!Number.isInteger(keep) || keep < 1 || keep > n) {
    throw new EmulatorError('TANDEM_EMULATOR_KEEP_INVALID', `keep must be an integer in [${n === 1 ? 1 : 2}, ${n}] (the middle has ${n} blocks), got ${keep}`, { field: 'keep', details: { keep, middle: n } });
  }
  if (keep === 1) {
    if (n === 1) return [0];
    throw new EmulatorError('TANDEM_EMULATOR_KEEP_INVALID', `keep must be at least 2 so the first and last of the ${n} middle blocks stay, got 1`, { field: 'keep', details: { keep, middle: n } });
  }
  const stride = (n - 1) / (keep - 1);
  return Array.from({ length: keep }, (_, i) => roundHalfEven(i * stride));
}

/** The model's blocks and where the emulator sits in them. */
export interface EmulatorLayout {
  /** Blocks of the full model, L. */
  numLayers: number;
  cut: Cut;
  /** Full-model indices of the kept middle blocks, ascending. */
  kept: number[];
}

export function checkCut(numLayers: number, cut: Cut): void {
  const { bottom, top } = cut;
  if (!Number.isInteger(bottom) || !Number.isInteger(top) || bottom < 0 || top < 0 || bottom + top >= numLayers) {
    throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `cut (${bottom}, ${top}) needs B, T ≥ 0 and B + T < ${numLayers} so the middle keeps a block`, { field: 'cut' });
  }
}

/** The layout of an emulator keeping `keep` of the middle blocks [B, L−T). */
export function emulatorLayout(numLayers: number, cut: Cut, keep: number): EmulatorLayout {
  checkCut(numLayers, cut);
  const n = numLayers - cut.bottom - cut.top;
  return { numLayers, cut: { ...cut }, kept: keptMiddleIndices(n, keep).map((i) => cut.bottom + i) };
}

/** Checks a layout read from a file: the kept blocks lie in the middle, ascending, the first and last among them. */
export function checkLayout(layout: EmulatorLayout, file?: string): void {
  const { numLayers, cut, kept } = layout;
  checkCut(numLayers, cut);
  const start = cut.bottom;
  const end = numLayers - cut.top;
  const ok = kept.length >= 1 && kept.every((k, i) => Number.isInteger(k) && k >= start && k < end && (i === 0 || k > kept[i - 1])) && kept[0] === start && kept[kept.length - 1] === end - 1;
  if (!ok) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `kept layers ${JSON.stringify(kept)} must ascend inside the middle [${start}, ${end}) and include its first and last block`, { file, field: 'keptLayers' });
}

/** Blocks of the emulated model: B + K + T. */
export function emulatedLayerCount(layout: EmulatorLayout): number {
  return layout.cut.bottom + layout.kept.length + layout.cut.top;
}

/** The full model's index of emulated block j. */
export function toFullLayer(layout: EmulatorLayout, j: number): number {
  const { cut, kept, numLayers } = layout;
  if (j < cut.bottom) return j;
  if (j < cut.bottom + kept.length) return kept[j - cut.bottom];
  return numLayers - cut.top + (j - cut.bottom - kept.length);
}

/** The emulated model's index of full block i; undefined for a dropped middle block. */
export function toEmulatedLayer(layout: EmulatorLayout, i: number): number | undefined {
  const { cut, kept, numLayers } = layout;
  if (i < cut.bottom) return i;
  if (i >= numLayers - cut.top) return cut.bottom + kept.length + (i - (numLayers - cut.top));
  const at = kept.indexOf(i);
  return at < 0 ? undefined : cut.bottom + at;
}

/** The bottom and top blocks, by full-model index: what an offsite adapter may train. */
export function edgeLayers(layout: EmulatorLayout): number[] {
  const { cut, numLayers } = layout;
  return [...Array.from({ length: cut.bottom }, (_, i) => i), ...Array.from({ length: cut.top }, (_, i) => numLayers - cut.top + i)];
}
