// The privacy attacks and defenses on the shipped stories260K: the attacks recover what an
// undefended edge leaks, the defenses have their stated scale and cut the leak.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  AdamW,
  AUTO_DEFENSES,
  DefendedMiddle,
  autoDefenses,
  defenseNames,
  Trainer,
  createAdapter,
  distanceCorrelation,
  LlamaModel,
  LocalMiddle,
  Rng,
  baseBottom,
  hiddenNoiseStd,
  initBackend,
  labelBatch,
  labelClasses,
  marvellInPlace,
  medianTokenNorm,
  labelLeakage,
  learnedInversion,
  loadModelFolder,
  loadTokenizer,
  middleGradients,
  nearestNeighbourInversion,
  noiseHiddenInPlace,
  observedBottom,
  parseDefenses,
  perturbGradientInPlace,
  readDataset,
  rocAuc,
  solveMarvellSplit,
  spreadScales,
  streamRows,
  tf,
  tokenStream,
} from '../../model/index.ts';
import type { Dataset, Middle, MicrobatchKey, Tokenizer } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const demoData = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
let model: LlamaModel;
let tokenizer: Tokenizer;
let dataset: Dataset;

before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(fixture);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  tokenizer = await loadTokenizer(fixture);
  dataset = await readDataset(demoData);
});
after(() => model.dispose());

function sampleStd(xs: Float64Array): number {
  let mean = 0;
  for (const x of xs) mean += x / xs.length;
  let v = 0;
  for (const x of xs) v += (x - mean) ** 2;
  return Math.sqrt(v / (xs.length - 1));
}

describe('rocAuc', () => {
  it('is 1 for a perfect score, 0 reversed and 0.5 for ties', () => {
    assert.equal(rocAuc([0.1, 0.2, 0.8, 0.9], [false, false, true, true]), 1);
    assert.equal(rocAuc([0.9, 0.8, 0.2, 0.1], [false, false, true, true]), 0);
    assert.equal(rocAuc([1, 1, 1, 1], [false, true, false, true]), 0.5);
    assert.equal(rocAuc([0.1, 0.4, 0.35, 0.8], [false, false, true, true]), 0.75);
  });
});

describe('defense parsing', () => {
  it('reads the known defenses with their parameters', () => {
    assert.deepEqual(parseDefenses('noise:0.5:3,max-norm,gradient-noise:2,deeper-bottom:1,nopeek:0.5,marvell:4'), { noise: { sigma: 0.5, clip: 3 }, maxNorm: true, gradientNoise: { rho: 2 }, deeperBottom: 1, nopeek: { weight: 0.5 }, marvell: { scale: 4 } });
    assert.deepEqual(parseDefenses('marvell'), { marvell: { scale: 1 } });
    assert.deepEqual(parseDefenses('none'), {});
    assert.equal(parseDefenses('auto'), 'auto');
  });
  it('refuses an unknown defense and out-of-range parameters with typed errors', () => {
    assert.throws(() => parseDefenses('noise,shuffle'), (e: Error & { code?: string }) => e.code === 'TANDEM_DEFENSE_UNKNOWN' && /shuffle/.test(e.message));
    assert.throws(() => parseDefenses('noise:-1'), (e: Error & { code?: string }) => e.code === 'TANDEM_DEFENSE_INVALID' && /sigma/.test(e.message));
    assert.throws(() => parseDefenses('deeper-bottom:1.5'), (e: Error & { code?: string }) => e.code === 'TANDEM_DEFENSE_INVALID');
    assert.throws(() => parseDefenses('marvell:0'), (e: Error & { code?: string }) => e.code === 'TANDEM_DEFENSE_INVALID' && /marvell/.test(e.message));
    assert.throws(() => parseDefenses('gradient-noise:1000'), (e: Error & { code?: string }) => e.code === 'TANDEM_DEFENSE_INVALID' && /100/.test(e.message));
  });
});

describe('calibrated noise on h_B', () => {
  it('clips each token to the stated norm and adds noise of the stated standard deviation', () => {
    const hidden = 64;
    const tokens = 2000;
    const rng = new Rng(7);
    const h = new Float32Array(hidden * tokens).map(() => 3 * rng.normal());
    const clip = 10;
    const clipped = Float32Array.from(h);
    for (let t = 0; t < tokens; t++) {
      let s = 0;
      for (let j = 0; j < hidden; j++) s += clipped[t * hidden + j] ** 2;
      const k = Math.min(1, clip / Math.sqrt(s));
      for (let j = 0; j < hidden; j++) clipped[t * hidden + j] *= k;
    }
    const noise = { sigma: 0.5, clip };
    const noised = Float32Array.from(h);
    noiseHiddenInPlace(noised, hidden, noise, new Rng(8));
    const residual = new Float64Array(h.length);
    for (let i = 0; i < h.length; i++) residual[i] = noised[i] - clipped[i];
    const stated = hiddenNoiseStd(noise, hidden);
    assert.ok(Math.abs(stated - (0.5 * 10) / 8) < 1e-12);
    // The sample standard deviation of n normals has standard error σ/√(2n); allow 5 of them.
    const n = residual.length;
    const tolerance = (5 * stated) / Math.sqrt(2 * n);
    const measured = sampleStd(residual);
    assert.ok(Math.abs(measured - stated) < tolerance, `measured ${measured}, stated ${stated} ± ${tolerance}`);
    let mean = 0;
    for (const r of residual) mean += r / n;
    assert.ok(Math.abs(mean) < (5 * stated) / Math.sqrt(n), `mean ${mean}`);
  });

  it('max-norm brings every example to the largest expected squared norm of its micro-batch', () => {
    const rowSize = 4096;
    const g = new Float32Array(rowSize * 3);
    const norms = [1, 3, 5];
    norms.forEach((target, r) => {
      for (let j = 0; j < rowSize; j++) g[r * rowSize + j] = target / Math.sqrt(rowSize);
    });
    perturbGradientInPlace(g, rowSize, { maxNorm: true }, new Rng(3));
    for (let r = 0; r < 3; r++) {
      let s = 0;
      for (let j = 0; j < rowSize; j++) s += g[r * rowSize + j] ** 2;
      // E‖g'‖² = 25; its spread is about 2·√(2/n)·(25 − ‖g‖²) ≈ 1.1 here.
      assert.ok(Math.abs(s - 25) < 4, `row ${r}: squared norm ${s}`);
    }
  });

  it('DefendedMiddle hands the inner middle h_B with the noise and g_M with the label noise', async () => {
    const seen: { h?: Float32Array; g?: Float32Array } = {};
    const inner = new LocalMiddle(model, 1, 4);
    // What the cloud would receive: a middle that records its inputs before running them.
    const recording: Middle = {
      trainsParameters: false,
      forward: async (h: tf.Tensor3D, key: MicrobatchKey, backward: boolean) => {
        seen.h = Float32Array.from(h.dataSync());
        return inner.forward(h, key, backward);
      },
      backward: async (g: tf.Tensor3D, key: MicrobatchKey) => {
        seen.g = Float32Array.from(g.dataSync());
        return inner.backward(g, key);
      },
    };
    const defended = new DefendedMiddle(recording, { noise: { sigma: 1, clip: 0 }, gradientNoise: { rho: 1 } }, 5);
    const rows = streamRows(tokenStream(dataset, tokenizer), 16, 8);
    const clean = baseBottom(model, rows, 1);
    const hB = tf.tensor3d(clean, [rows.length, 16, 64]);
    const hM = await defended.forward(hB, { step: 0, microbatch: 0 }, true);
    const clip = defended.applied.noise?.clip ?? 0;
    assert.ok(clip > 0, 'the clip norm is fixed from the first h_B');
    assert.ok(seen.h && seen.h.length === clean.length);
    const residual = new Float64Array(clean.length);
    let clippedAway = 0;
    for (let t = 0; t < clean.length; t += 64) {
      let s = 0;
      for (let j = 0; j < 64; j++) s += clean[t + j] ** 2;
      const k = Math.min(1, clip / Math.sqrt(s));
      if (k < 1) clippedAway++;
      for (let j = 0; j < 64; j++) residual[t + j] = (seen.h[t + j] ?? 0) - clean[t + j] * k;
    }
    assert.ok(clippedAway > 0, 'the median clip norm clips about half the tokens');
    const stated = hiddenNoiseStd({ sigma: 1, clip }, 64);
    assert.ok(Math.abs(sampleStd(residual) - stated) < (5 * stated) / Math.sqrt(2 * residual.length));
    const g = tf.onesLike(hM);
    const gB = await defended.backward(g, { step: 0, microbatch: 0 });
    assert.ok(seen.g);
    const ones = g.dataSync();
    assert.ok(seen.g.some((x, i) => x !== ones[i]), 'g_M was perturbed before it left');
    tf.dispose([hB, hM, g, gB]);
    defended.dispose();
  });
});

describe('noise taken back and shaped', () => {
  it('DefendedMiddle takes its own perturbation back out of the h_M it receives', async () => {
    let sent: Float32Array | undefined;
    const inner = new LocalMiddle(model, 3, 4);
    const recording: Middle = {
      trainsParameters: false,
      forward: async (h: tf.Tensor3D, key: MicrobatchKey, backward: boolean) => {
        sent = Float32Array.from(h.dataSync());
        return inner.forward(h, key, backward);
      },
      backward: async (g: tf.Tensor3D, key: MicrobatchKey) => inner.backward(g, key),
    };
    const rows = streamRows(tokenStream(dataset, tokenizer), 16, 4);
    const shape: [number, number, number] = [rows.length, 16, 64];
    const clean = baseBottom(model, rows, 3);
    const hB = tf.tensor3d(clean, shape);
    const key = { step: 0, microbatch: 0, eval: true };
    const restored = new DefendedMiddle(recording, { noise: { sigma: 0.5, clip: 0 } }, 5);
    const out = Float32Array.from((await restored.forward(hB, key, false)).dataSync());
    assert.ok(sent);
    const sentRestored = sent;
    // What the cloud computed on what it received, plus the edge's own h_B − what it sent.
    const cloudOut = await inner.forward(tf.tensor3d(sentRestored, shape), key, false);
    const expected = cloudOut.dataSync();
    let worst = 0;
    for (let i = 0; i < out.length; i++) worst = Math.max(worst, Math.abs(out[i] - (expected[i] + clean[i] - sentRestored[i])));
    assert.ok(worst < 1e-4, `restored h_M is off by ${worst}`);
    // Against the undefended h_M, the restored one is much closer than the one left as received.
    const truth = (await inner.forward(hB, key, false)).dataSync();
    const plain = new DefendedMiddle(recording, { noise: { sigma: 0.5, clip: 0, restore: false } }, 5);
    const unrestored = (await plain.forward(hB, key, false)).dataSync();
    let errRestored = 0;
    let errPlain = 0;
    for (let i = 0; i < out.length; i++) {
      errRestored += (out[i] - truth[i]) ** 2;
      errPlain += (unrestored[i] - truth[i]) ** 2;
    }
    assert.ok(errRestored < 0.75 * errPlain, `restored error ${errRestored}, left as received ${errPlain}`);
    tf.dispose([hB, cloudOut]);
  });

  it('noise-spread has per-dimension standard deviations in proportion to the spread of h_B, at the stated RMS', () => {
    const hidden = 8;
    const tokens = 4000;
    const rng = new Rng(11);
    const spread = [0.5, 1, 1, 2, 2, 3, 4, 0.25];
    const h = new Float32Array(hidden * tokens).map((_, i) => 7 + spread[i % hidden] * rng.normal());
    const scales = spreadScales(h, hidden);
    const rms = Math.sqrt(spread.reduce((a, x) => a + x * x, 0) / hidden);
    scales.forEach((x, j) => assert.ok(Math.abs(x - spread[j] / rms) < 0.05 * (spread[j] / rms) + 0.01, `scale ${j}: ${x} against ${spread[j] / rms}`));
    assert.ok(Math.abs(Math.sqrt(scales.reduce((a, x) => a + x * x, 0) / hidden) - 1) < 1e-9, 'the scales have RMS 1');
    const parsed = parseDefenses('noise-spread:0.5:1000');
    assert.ok(parsed !== 'auto' && parsed.noise?.spread === true);
    assert.deepEqual(defenseNames(parsed), ['noise'], 'offered as the noise defense');
    const noise = { ...parsed.noise, scales };
    const noised = Float32Array.from(h);
    noiseHiddenInPlace(noised, hidden, noise, new Rng(12));
    const stated = hiddenNoiseStd(noise, hidden);
    for (let j = 0; j < hidden; j++) {
      const r = new Float64Array(tokens);
      for (let t = 0; t < tokens; t++) r[t] = noised[t * hidden + j] - h[t * hidden + j];
      const want = stated * scales[j];
      assert.ok(Math.abs(sampleStd(r) - want) < (5 * want) / Math.sqrt(2 * tokens), `dimension ${j}: std ${sampleStd(r)}, stated ${want}`);
    }
  });

  it('auto moves the bottom to three blocks where the model has them and leaves a middle', () => {
    const rest = { noise: AUTO_DEFENSES.noise, marvell: AUTO_DEFENSES.marvell };
    assert.equal(AUTO_DEFENSES.deeperBottom, 2, 'without a model, the default cut B = 1 moves to 3');
    assert.deepEqual(autoDefenses(5, { bottom: 1, top: 1 }), { ...rest, deeperBottom: 2 });
    assert.deepEqual(autoDefenses(5, { bottom: 2, top: 1 }), { ...rest, deeperBottom: 1 });
    assert.deepEqual(autoDefenses(5, { bottom: 3, top: 1 }), rest);
    assert.deepEqual(autoDefenses(5, { bottom: 1, top: 2 }), { ...rest, deeperBottom: 1 });
    assert.deepEqual(autoDefenses(32, { bottom: 1, top: 1 }), { ...rest, deeperBottom: 2 });
    assert.deepEqual(autoDefenses(32, { bottom: 4, top: 1 }), rest);
  });
});

describe('attacks on stories260K', () => {
  it('inverts h_B at B = 1 almost exactly, and strong noise cuts recovery by more than half', () => {
    const stream = tokenStream(dataset, tokenizer);
    const rows = streamRows(stream, 16, 2);
    const publicRows = streamRows(stream.slice(64), 16, 64);
    const observed = baseBottom(model, rows, 1);
    const nn = nearestNeighbourInversion(model, rows, observed, 1);
    const learned = learnedInversion(model, rows, observed, 1, {}, { publicRows });
    assert.equal(nn.tokens, 32);
    assert.ok(nn.recovery >= 0.9, `nearest neighbour ${nn.recovery}`);
    assert.ok(learned.recovery >= 0.5, `learned ${learned.recovery}`);
    const clip = 2; // about the median token norm at B = 1
    const noise = { noise: { sigma: 4, clip } };
    const noisy = observedBottom(model, rows, 1, noise, new Rng(1));
    const nnNoisy = nearestNeighbourInversion(model, rows, noisy, 1);
    const learnedNoisy = learnedInversion(model, rows, noisy, 1, noise, { publicRows });
    assert.ok(nnNoisy.recovery <= nn.recovery / 2, `noisy nearest neighbour ${nnNoisy.recovery}`);
    assert.ok(learnedNoisy.recovery <= learned.recovery / 2, `noisy learned ${learnedNoisy.recovery}`);
  });

  it('the nearest-neighbour attack that knows the noise defense clips its candidates as the edge does', () => {
    const rows = streamRows(tokenStream(dataset, tokenizer), 16, 2);
    const clean = baseBottom(model, rows, 3);
    // A clip well under the median norm and little noise: the clip, not the noise, is what hides the tokens from a naive search.
    const noise = { sigma: 0.05, clip: 0.5 * medianTokenNorm(clean, 64) };
    const observed = observedBottom(model, rows, 3, { noise }, new Rng(4));
    const naive = nearestNeighbourInversion(model, rows, observed, 3);
    const informed = nearestNeighbourInversion(model, rows, observed, 3, 64, noise);
    assert.ok(informed.recovery >= 0.9, `informed ${informed.recovery}`);
    assert.ok(informed.recovery > naive.recovery, `informed ${informed.recovery}, naive ${naive.recovery}`);
  });

  it('the direction attack reads the labels from g_M, and max-norm with gradient noise hides them', () => {
    const labels = labelBatch(dataset, tokenizer, 96, 64);
    assert.ok(labels);
    const cut = { bottom: 1, top: 1 };
    const open = labelLeakage(middleGradients(model, labels.batch, cut, {}, 8, new Rng(0)), labels.classes);
    assert.equal(open.classes, 3);
    assert.ok(open.aucDirection > 0.7, `undefended direction AUC ${open.aucDirection}`);
    const defended = labelLeakage(middleGradients(model, labels.batch, cut, { maxNorm: true, gradientNoise: { rho: 4 } }, 8, new Rng(0)), labels.classes);
    assert.ok(defended.aucDirection <= 0.62, `defended direction AUC ${defended.aucDirection}`);
    assert.ok(defended.aucNorm <= 0.62, `defended norm AUC ${defended.aucNorm}`);
  });
});

describe('NoPeek', () => {
  it('distance correlation is 1 for a linear image and near 0 for independent rows', () => {
    const rng = new Rng(11);
    const n = 200;
    const x = tf.tensor2d(Array.from({ length: n * 4 }, () => rng.normal()), [n, 4]);
    const y = tf.tensor2d(Array.from({ length: n * 4 }, () => rng.normal()), [n, 4]);
    const same = distanceCorrelation(x, tf.add(tf.mul(x, 3), 1) as tf.Tensor2D).dataSync()[0];
    const independent = distanceCorrelation(x, y).dataSync()[0];
    assert.ok(Math.abs(same - 1) < 1e-3, `dCor(x, 3x + 1) = ${same}`);
    assert.ok(independent < 0.3, `dCor of independent rows ${independent}`);
    tf.dispose([x, y]);
  });

  it('training with the NoPeek term lowers dCor(token embeddings, h_B) where training without it does not', async () => {
    const rows = streamRows(tokenStream(dataset, tokenizer), 16, 4);
    const batch = { ids: rows, labels: rows };
    const dcorAfter = async (noPeek: number): Promise<number> => {
      const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'], layersToTransform: [0] }], { seed: 1 });
      const trainer = new Trainer({ model, adapter, optimizer: new AdamW(), schedule: { kind: 'constant', lr: 0.05, warmupSteps: 0, totalSteps: 8 }, cut: { bottom: 1, top: 1 }, noPeek });
      for (let i = 0; i < 6; i++) await trainer.trainStep([batch]);
      const value = tf.tidy(() => {
        const ids = tf.tensor2d(rows.flat(), [rows.length, 16], 'int32');
        const x = tf.reshape(model.embed(ids), [-1, 64]) as tf.Tensor2D;
        const h = tf.reshape(model.blocks(model.embed(ids, { hooks: adapter.hooks }), 0, 1, { hooks: adapter.hooks, positionOffset: 0 }), [-1, 64]) as tf.Tensor2D;
        return distanceCorrelation(x, h).dataSync()[0];
      });
      trainer.dispose();
      adapter.dispose();
      return value;
    };
    const plain = await dcorAfter(0);
    const nopeek = await dcorAfter(5);
    assert.ok(nopeek < plain - 0.01, `dCor after NoPeek training ${nopeek}, without ${plain}`);
  });
});

function meanPower(gradients: readonly Float32Array[]): number {
  let p = 0;
  for (const g of gradients) for (const x of g) p += x * x;
  return p / gradients.length;
}

describe('Marvell', () => {
  it('the reduced problem keeps to the power budget and lowers the divergence of the classes', () => {
    const st = { delta2: 4, dim: 256, p: 0.3, sIn: 0.01, sOut: 0.012, power: 4 };
    const split = solveMarvellSplit(st);
    const used = st.p * (split.uIn + (st.dim - 1) * split.vIn) + (1 - st.p) * (split.uOut + (st.dim - 1) * split.vOut);
    assert.ok(used <= st.power * (1 + 1e-9), `used ${used} of ${st.power}`);
    assert.ok(split.klAfter < split.klBefore / 2, `KL ${split.klBefore} → ${split.klAfter}`);
    assert.equal(solveMarvellSplit({ ...st, power: 0 }).klAfter, split.klBefore, 'no budget, no noise');
  });

  it('the class of a label row is its label tokens', () => {
    assert.deepEqual(labelClasses([[-100, -100, 7, 2], [-100, 7, 2, -100], [-100, -100, 9, 2]]), ['7,2', '7,2', '9,2']);
  });

  it('adds noise only where rows share a class: plain text rows are left as they are', () => {
    const rng = new Rng(4);
    const g = new Float32Array(4 * 32).map(() => rng.normal());
    const text = Float32Array.from(g);
    marvellInPlace(text, 32, ['a', 'b', 'c', 'd'], 1, new Rng(5));
    assert.deepEqual(text, g);
    const labelled = Float32Array.from(g);
    marvellInPlace(labelled, 32, ['a', 'b', 'a', 'b'], 1, new Rng(5));
    assert.ok(labelled.some((x, i) => x !== g[i]));
  });

  it('hides the labels of a real label task from both attacks, with far less noise than isotropic gradient noise', () => {
    const labels = labelBatch(dataset, tokenizer, 96, 64);
    assert.ok(labels);
    const cut = { bottom: 1, top: 1 };
    const clean = middleGradients(model, labels.batch, cut, {}, 8, new Rng(0));
    const open = labelLeakage(clean, labels.classes);
    const marvell = middleGradients(model, labels.batch, cut, { marvell: { scale: 1 } }, 8, new Rng(0));
    const hidden = labelLeakage(marvell, labels.classes);
    assert.ok(open.aucNorm > 0.65 && open.aucDirection > 0.7, `undefended AUC ${open.aucNorm} / ${open.aucDirection}`);
    assert.ok(hidden.aucNorm <= 0.6 && hidden.aucDirection <= 0.6, `Marvell AUC ${hidden.aucNorm} / ${hidden.aucDirection}`);
    const isotropic = middleGradients(model, labels.batch, cut, { maxNorm: true, gradientNoise: { rho: 4 } }, 8, new Rng(0));
    assert.ok(meanPower(marvell) < meanPower(isotropic) / 4, `power ${meanPower(marvell)} against ${meanPower(isotropic)}`);
  });

  it('a Trainer hands DefendedMiddle the labels, which Marvell uses and the inner middle never sees', async () => {
    const labels = labelBatch(dataset, tokenizer, 8, 32);
    assert.ok(labels && new Set(labels.classes).size > 1);
    const seen: tf.Tensor3D[] = [];
    let labelsSeen = 0;
    const inner = new LocalMiddle(model, 1, 4);
    const recording: Middle = {
      trainsParameters: false,
      forward: (h, key, backward) => inner.forward(h, key, backward),
      backward: async (g: tf.Tensor3D, key: MicrobatchKey, rows?: readonly (readonly number[])[]) => {
        if (rows) labelsSeen++;
        seen.push(tf.clone(g));
        return inner.backward(g, key);
      },
    };
    const gradientsFor = async (defenses: { marvell?: { scale: number } }): Promise<Float32Array> => {
      const adapter = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj'], layersToTransform: [0] }], { seed: 1 });
      const trainer = new Trainer({ model, adapter, optimizer: new AdamW(), schedule: { kind: 'constant', lr: 0, warmupSteps: 0, totalSteps: 1 }, cut: { bottom: 1, top: 1 }, middle: new DefendedMiddle(recording, defenses, 3) });
      await trainer.trainStep([labels.batch]);
      trainer.dispose();
      adapter.dispose();
      const g = seen.pop() as tf.Tensor3D;
      const data = Float32Array.from(g.dataSync());
      g.dispose();
      return data;
    };
    const plain = await gradientsFor({});
    const defended = await gradientsFor({ marvell: { scale: 1 } });
    assert.equal(labelsSeen, 0, 'the labels stop at the edge');
    assert.equal(plain.length, defended.length);
    assert.ok(defended.some((x, i) => Math.abs(x - plain[i]) > 1e-6), 'Marvell perturbed g_M');
  });
});
