// What a federation asks of an owner's local round: FedProx's proximal gradient is exactly the
// gradient of μ/2·‖w − w_global‖² (against autodiff), μ = 0 trains exactly as FedAvg's local
// training, μ > 0 stays closer to the global adapter, and FFA-LoRA leaves every A untouched;
// on the cloud, ffa-lora and exact-product aggregations of real LoRA deltas.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  DEFAULT_RECIPE, LlamaModel, addProximalGradients, constrainLocalRound, createAdapter, fedAvg, flatten, initBackend, layoutOf, loadModelFolder, loadTokenizer,
  loraAwareDelta, openRun, proximalTerm, runSteps, saveAdapter, tf,
} from '../../../model/index.ts';
import type { LocalRoundOptions, TensorSet, TrainingSpec } from '../../../model/index.ts';

const STORIES = join(import.meta.dirname, '..', '..', 'fixtures', 'stories260K');
const DATA = join(import.meta.dirname, '..', '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
let dir = '';
let spec: TrainingSpec;
let model: LlamaModel;
let global: TensorSet;

before(async () => {
  await initBackend({ backend: 'wasm' });
  dir = await mkdtemp(join(tmpdir(), 'tandem-local-round-'));
  const loaded = await loadModelFolder(STORIES);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'], initLoraWeights: false }], { seed: 4 });
  global = Object.fromEntries([...adapter.trainableVariables()].map(([k, v]) => [k, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) }]));
  await saveAdapter(adapter, join(dir, 'global'));
  adapter.dispose();
  spec = {
    model, tokenizer: await loadTokenizer(STORIES), modelHash: loaded.contentHash, dataFile: DATA, baseModel: STORIES, methods: [], adapterDir: join(dir, 'global'), evaluate: false,
    recipe: { ...DEFAULT_RECIPE, steps: 4, batchSize: 4, seqLen: 16, lr: 0.02, warmupSteps: 0, valFraction: 0, seed: 9 },
  };
});
after(async () => {
  model?.dispose?.();
  await rm(dir, { recursive: true, force: true });
});

/** A local round from the global adapter under `options` (none: plain FedAvg local training). */
async function localRound(options?: LocalRoundOptions): Promise<TensorSet> {
  const state = await openRun(spec);
  const undo = options ? constrainLocalRound(state.adapter, options) : () => undefined;
  try {
    const r = await runSteps(state, spec);
    return Object.fromEntries([...r.adapter].map(([k, v]) => [k, { shape: v.shape, data: v.data }]));
  } finally {
    undo();
    state.optimizer.dispose();
    state.adapter.dispose();
  }
}

function distance(a: TensorSet, b: TensorSet): number {
  return Math.sqrt(Object.keys(a).reduce((s, k) => s + a[k].data.reduce((t, v, i) => t + (v - b[k].data[i]) ** 2, 0), 0));
}

describe('FedProx and FFA-LoRA on the owner', () => {
  it("the proximal gradient is autodiff's gradient of μ/2·‖w − w_global‖², added to the loss's", () => {
    const w = new Map<string, tf.Variable>([['x', tf.variable(tf.tensor2d([[1, -2, 3.5], [0.25, 4, -1]]))], ['y', tf.variable(tf.tensor1d([7, -3]))]]);
    const g = new Map<string, tf.Tensor>([['x', tf.tensor2d([[0.5, -2, 1], [1, 1, 1]])], ['y', tf.tensor1d([6, 0])]]);
    const mu = 0.3;
    const auto = tf.variableGrads(() => proximalTerm(w, g, mu), [...w.values()]);
    const loss = new Map<string, tf.Tensor>([['x', tf.ones([2, 3])]]);
    addProximalGradients(loss, w, g, mu);
    for (const k of ['x', 'y']) {
      const want = auto.grads[w.get(k)!.name].dataSync();
      const got = loss.get(k)!.dataSync();
      want.forEach((v, i) => assert.ok(Math.abs(got[i] - (v + (k === 'x' ? 1 : 0))) <= 1e-6, `${k}[${i}]: ${got[i]} vs ${v}`));
    }
    // By hand: μ·(w − g) for y, with no loss gradient there.
    assert.deepEqual([...loss.get('y')!.dataSync()].map((v) => Math.round(v * 1e6) / 1e6), [0.3, -0.9]);
    tf.dispose([...w.values(), ...g.values(), ...loss.values(), auto.value, ...Object.values(auto.grads)]);
  });

  it('μ = 0 trains exactly as FedAvg; μ > 0 ends nearer the global adapter; FFA-LoRA leaves every A as it was', async () => {
    const plain = await localRound();
    const mu0 = await localRound({ fedproxMu: 0 });
    for (const k of Object.keys(plain)) assert.deepEqual(mu0[k].data, plain[k].data, `${k} differs at μ = 0`);
    const prox = await localRound({ fedproxMu: 50 });
    assert.ok(distance(prox, global) < 0.9 * distance(plain, global), `μ 50: ${distance(prox, global)} vs μ 0: ${distance(plain, global)}`);
    const ffa = await localRound({ freezeLoraA: true, fedproxMu: 1 });
    for (const k of Object.keys(ffa)) {
      if (k.includes('lora_A')) assert.deepEqual(ffa[k].data, global[k].data, `${k} moved`);
      else assert.ok(distance({ k: ffa[k] }, { k: global[k] }) > 0, `${k} did not train`);
    }
    // The adapter's own projection is restored afterwards: the next plain round is the first one again.
    const again = await localRound();
    for (const k of Object.keys(plain)) assert.deepEqual(again[k].data, plain[k].data);
  });

  it('ffa-lora averages B alone; exact-product averages B·A, which naive A/B averaging misses', async () => {
    const layout = layoutOf(global);
    const g = flatten(global, layout);
    const a = flatten(await localRound(), layout).map((v, i) => v - g[i]);
    spec.recipe = { ...spec.recipe, seed: 10, lr: 0.05 };
    const b = flatten(await localRound(), layout).map((v, i) => v - g[i]);
    const updates = [{ values: a, weight: 3 }, { values: b, weight: 1 }];
    const ffa = loraAwareDelta('ffa-lora', g, updates, layout).delta;
    const avg = fedAvg(updates);
    let o = 0;
    for (const [i, key] of layout.keys.entries()) {
      const n = layout.shapes[i].reduce((x, y) => x * y, 1);
      for (let j = o; j < o + n; j++) assert.equal(ffa[j], key.includes('lora_A') ? 0 : avg[j]);
      o += n;
    }
    const exact = loraAwareDelta('exact-product', g, updates, layout);
    // Eckart–Young: the rank-r truncation is the best rank-r approximation, mean(B)·mean(A) one of them.
    assert.ok(exact.lora!.refactorError <= exact.lora!.naiveError + 1e-6, JSON.stringify(exact.lora));
    assert.ok(exact.lora!.naiveError > 0, 'two owners moved A differently: mean(B)·mean(A) is not mean(B·A)');
    assert.equal(exact.delta.length, g.length);
  });
});
