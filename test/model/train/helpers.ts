// Small fixtures for training tests: a tiny random model, deterministic batches, adapter snapshots.
import { llamaConfig, randomWeights } from '../../../model/init.ts';
import { LlamaModel } from '../../../model/llama/llama.ts';
import type { Adapter } from '../../../model/peft/adapter.ts';
import { Rng } from '../../../model/random.ts';

export const tinyConfig = llamaConfig({ hidden: 16, layers: 3, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });

export function tinyModel(seed = 1): LlamaModel {
  return LlamaModel.fromArrays(tinyConfig, randomWeights(tinyConfig, seed, 0.2));
}

/** The adapter's values by name, for bit-for-bit comparisons. */
export function snapshot(adapter: Adapter): Map<string, Float32Array> {
  return new Map([...adapter.trainableVariables()].map(([n, v]) => [n, Float32Array.from(v.dataSync() as Float32Array)]));
}

export function maxAbsDiff(a: Map<string, Float32Array>, b: Map<string, Float32Array>): number {
  let m = 0;
  for (const [n, x] of a) {
    const y = b.get(n);
    if (!y) return Infinity;
    for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]));
  }
  return m;
}

/** Deterministic pseudo-text batches: rows of ids in [3, vocab), labels equal to ids. */
export function randomBatch(seed: number, rows: number, seq: number, vocab = tinyConfig.vocabSize): { ids: number[][]; labels: number[][] } {
  const rng = new Rng(seed);
  const ids = Array.from({ length: rows }, () => Array.from({ length: seq }, () => 3 + rng.int(vocab - 3)));
  return { ids, labels: ids.map((r) => [...r]) };
}
