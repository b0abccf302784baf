// GenerationLoop's selection over a vocabulary of Qwen2's size: the top logits and the sampled
// ids equal those of a whole-vocabulary sort (the reference below: every id as an object,
// sorted, as the loop did before it selected in one pass and sorted typed arrays), ties included.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { GenerationLoop, ModelError, Rng } from '../../model/index.ts';
import type { ModelConfig } from '../../model/index.ts';

const VOCAB = 151_936;
const config = { maxPositionEmbeddings: 4096, eosTokenIds: [], bosTokenId: undefined } as unknown as ModelConfig;

function logits(seed: number, levels: number): Float32Array {
  const rng = new Rng(seed);
  // Few distinct values: many ties, at the top too.
  return Float32Array.from({ length: VOCAB }, () => Math.floor(rng.next() * levels) / 4);
}

/** No ties: roughly Gaussian logits of the given spread, a few masked to -Infinity. */
function spread(seed: number, scale: number): Float32Array {
  const rng = new Rng(seed);
  return Float32Array.from({ length: VOCAB }, (_, id) => (id % 997 === 5 ? -Infinity : scale * (rng.next() + rng.next() + rng.next() - 1.5)));
}

function referenceTop(values: Float32Array, k: number): { id: number; logit: number }[] {
  return Array.from(values, (logit, id) => ({ id, logit })).sort((a, b) => b.logit - a.logit || a.id - b.id).slice(0, k);
}

function referenceSample(values: Float32Array, temperature: number, topP: number, rng: Rng): number {
  let max = -Infinity;
  for (const v of values) if (v > max) max = v;
  const order = Array.from(values, (v, id) => ({ id, p: Math.exp((v - max) / temperature) }));
  let total = 0;
  for (const o of order) total += o.p;
  order.sort((a, b) => b.p - a.p || a.id - b.id);
  let kept = 0;
  let mass = 0;
  while (kept < order.length && (kept === 0 || mass < topP * total)) mass += order[kept++].p;
  let r = rng.next() * mass;
  for (let i = 0; i < kept; i++) {
    r -= order[i].p;
    if (r < 0) return order[i].id;
  }
  return order[kept - 1].id;
}

describe('GenerationLoop on a 152k vocabulary', () => {
  it('reports the same top logits as a whole sort, ties by the smaller id', () => {
    for (const [seed, levels, k] of [[1, 40, 10], [2, 3, 10], [3, 1000, 25], [4, 1, 5]] as const) {
      const values = logits(seed, levels);
      const loop = new GenerationLoop(config, [1], { maxNewTokens: 1, temperature: 0, topLogits: k, stopTokenIds: [] });
      loop.take(values);
      assert.deepEqual(loop.result().topLogits, referenceTop(values, k), `seed ${seed}`);
    }
  });

  it('samples the same ids as a whole sort for a seed, at several temperatures and top-p', () => {
    // Nothing is sorted beyond a bucket of ids: flat (3 levels, many ties), peaked, ties inside a
    // sorted bucket (100k levels), and tie-free logits.
    const leveled = [[1, 1, 60], [0.7, 0.9, 60], [1.3, 0.5, 60], [0.2, 1, 60], [1, 0.99, 60], [4, 0.95, 60], [1, 0.9, 3], [0.5, 0.3, 2], [1, 1, 1], [1, 0.9, 100_000], [50, 1, 100_000], [20, 0.8, 100_000]] as const;
    const spreads = [[1, 1, 4], [1, 0.9, 4], [0.8, 1, 40], [1, 0.95, 40], [2, 0.5, 1]] as const;
    const cases = [
      ...leveled.map(([temperature, topP, levels]) => ({ temperature, topP, steps: 4, row: (step: number) => logits(100 + step, levels), label: `${levels} levels` })),
      ...spreads.map(([temperature, topP, scale]) => ({ temperature, topP, steps: 8, row: (step: number) => spread(200 + step, scale), label: `spread ${scale}` })),
    ];
    for (const { temperature, topP, steps, row, label } of cases) {
      const loop = new GenerationLoop(config, [1], { maxNewTokens: steps, temperature, topP, seed: 9, stopTokenIds: [] });
      const rng = new Rng(9);
      const want: number[] = [];
      for (let step = 0; step < steps; step++) {
        const values = row(step);
        loop.take(values);
        want.push(referenceSample(values, temperature, topP, rng));
      }
      assert.deepEqual(loop.result().generatedIds, want, `temperature ${temperature}, top-p ${topP}, ${label}`);
    }
  });

  it('refuses logits holding a NaN or +Infinity, or masked everywhere, and takes -Infinity as a mask', () => {
    const take = (values: Float32Array) => new GenerationLoop(config, [1], { maxNewTokens: 2, temperature: 0 }).take(values);
    const masked = new Float32Array(8).fill(-Infinity);
    masked[5] = 0;
    assert.deepEqual(take(masked), [5]);
    for (const [at, v] of [[3, NaN], [6, Infinity]] as const) {
      const bad = new Float32Array(8);
      bad[at] = v;
      assert.throws(() => take(bad), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_LOGITS_NON_FINITE' && new RegExp(`id ${at}`).test(e.message));
    }
    assert.throws(() => take(new Float32Array(8).fill(-Infinity)), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_LOGITS_NON_FINITE');
  });
});
