import assert from 'node:assert/strict';
import { gradients, tf } from '../../../model/backend.ts';
import type { ModelConfig } from '../../../model/config.ts';
import { llamaConfig, randomWeights } from '../../../model/init.ts';
import { LlamaModel } from '../../../model/llama/llama.ts';
import { causalLmLoss } from '../../../model/loss.ts';
import type { Adapter } from '../../../model/peft/adapter.ts';
import { Rng } from '../../../model/random.ts';

export const LLAMA = llamaConfig({ hidden: 16, layers: 3, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });
/** Qwen2-style: q, k and v carry biases (for BitFit). */
export const QWEN2 = llamaConfig({ hidden: 16, layers: 2, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32, attentionBias: true, modelType: 'qwen2' });

export type Arrays = Map<string, { shape: number[]; data: Float32Array }>;

export function baseArrays(config: ModelConfig = LLAMA, seed = 11): Arrays {
  return randomWeights(config, seed, 0.15);
}

export function tinyModel(config: ModelConfig = LLAMA, seed = 11): LlamaModel {
  return LlamaModel.fromArrays(config, baseArrays(config, seed));
}

export const IDS = [
  [1, 5, 9, 3, 14, 2, 7, 30],
  [4, 4, 11, 0, 6, 8, 13, 21],
];

export function logits(model: LlamaModel, adapter?: Adapter, ids: number[][] = IDS): Float32Array {
  return tf.tidy(() => model.forward(tf.tensor2d(ids, undefined, 'int32'), { hooks: adapter?.hooks }).dataSync() as Float32Array);
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, 'same length');
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

export function assertClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string): void {
  const d = maxAbsDiff(a, b);
  assert.ok(d <= tol, `${what}: max |diff| ${d} > ${tol}`);
}

/** Copies of every weight's values, to check that they come back exactly. */
export function snapshot(model: LlamaModel): Map<string, Float32Array> {
  return new Map([...model.weights].map(([k, v]) => [k, v.dataSync().slice() as Float32Array]));
}

export function assertWeightsEqual(model: LlamaModel, snap: Map<string, Float32Array>, what: string): void {
  for (const [k, v] of model.weights) assert.deepEqual(v.dataSync(), snap.get(k), `${what}: ${k}`);
}

/** Adds N(0, std^2) noise to every trainable variable, making the adapter non-trivial. */
export function perturb(adapter: Adapter, seed = 5, std = 0.3): void {
  const rng = new Rng(seed);
  for (const v of adapter.trainableVariables().values()) {
    tf.tidy(() => v.assign(tf.add(v, tf.tensor(Float32Array.from({ length: v.size }, () => rng.normal() * std), v.shape))));
  }
}

export function lossOf(model: LlamaModel, adapter: Adapter, training = false): tf.Scalar {
  return tf.tidy(() => {
    const ids = tf.tensor2d(IDS, undefined, 'int32');
    const out = model.forward(ids, { hooks: adapter.hooks, training });
    const { loss, sum } = causalLmLoss(out, ids);
    sum.dispose();
    return loss;
  });
}

/** Plain gradient descent on the adapter's trainable variables; returns the loss before and after. */
export function train(model: LlamaModel, adapter: Adapter, steps = 6, lr = 0.5): { before: number; after: number } {
  const vars = [...adapter.trainableVariables().values()];
  assert.ok(vars.length > 0, 'the adapter has trainable variables');
  const first = lossOf(model, adapter);
  const before = first.dataSync()[0];
  first.dispose();
  for (let s = 0; s < steps; s++) {
    const { value, grads } = gradients(() => lossOf(model, adapter, true), vars);
    value.dispose();
    vars.forEach((v, i) => {
      const g = grads[i];
      assert.ok(g, `a gradient reaches ${v.name}`);
      tf.tidy(() => v.assign(tf.sub(v, tf.mul(g, lr))));
    });
    tf.dispose(grads.filter((g): g is tf.Tensor => g !== undefined));
  }
  const last = lossOf(model, adapter);
  const after = last.dataSync()[0];
  last.dispose();
  return { before, after };
}
