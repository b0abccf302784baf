// Federation of three real non-IID data owners: the amazon, imdb and yelp sources of the
// UCI sentiment-labelled-sentences data, each with a balanced held-out test split, fine-tuning
// LoRA (r 4 on q, v) and a sequence-classification score head on stories260K's mean-pooled
// final hidden states (model/train's SequenceClassifier: PEFT's modules_to_save = ["score"]).
// The LM head's label words stay near chance on this model; the score head learns the task.
// Accuracy on each owner's held-out data for: each owner alone, centralized training on the
// union, FedAvg, FedAvg + SecAgg and FedAvg + DP at ε ≈ 8; bytes per owner per round, round
// time and SecAgg's share of it. Also how the LoRA-aware aggregations differ on the owners'
// real updates: ‖ΔW_avg − ΔW_exact‖ / ‖ΔW_exact‖ of naive A/B averaging and of FFA-LoRA.
//
//   npm run bench -- federation [--rounds N] [--local-steps N] [--records N] [--test-per-class N] [--lr LR] [--dp-clip C] [--data DIR] [--quick]
//
// The rounds run in this process with the federation math of model/federation (the REST path
// is covered by test/cloud-node/federation*.test.ts); owners train one after another, so a
// round's time is the sum of the owners' local training plus aggregation, and SecAgg's share
// is its compute (keys, shares, masking, unmasking) over that.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  LlamaModel, RdpAccountant, SecAggOwner, SequenceClassifier, addGaussianNoise, classifiedRows, clipUpdate, createAdapter, fedAvg, initBackend,
  layoutOf, loadModelFolder, loadTokenizer, unflatten, unmaskSum,
} from '../model/index.ts';
import type { ClassifiedRow, Layout } from '../model/index.ts';

const root = join(import.meta.dirname, '..');
const STORIES = join(root, 'test', 'fixtures', 'stories260K');
const DEFAULT_SOURCES = join(root, '..', 'shared', 'fixtures', 'data', 'sentiment-labelled-sentences');
const OWNERS = { amazon: 'amazon_cells_labelled.txt', imdb: 'imdb_labelled.txt', yelp: 'yelp_labelled.txt' } as const;
type Owner = keyof typeof OWNERS;
const NAMES = Object.keys(OWNERS) as Owner[];

function flag(args: string[], name: string, fallback: number): number {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? Number(args[i + 1]) : fallback;
}

function shuffle<T>(xs: T[], seed: number): T[] {
  let s = seed >>> 0;
  const out = [...xs];
  for (let i = out.length - 1; i > 0; i--) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** Per owner: "sentence\tlabel" lines; a balanced test split of `testPerClass` per class, the rest (up to `limit` in all) to train. */
async function splits(dir: string, limit: number, testPerClass: number): Promise<Record<Owner, { train: { text: string; label: number }[]; test: { text: string; label: number }[] }>> {
  const out = {} as Record<Owner, { train: { text: string; label: number }[]; test: { text: string; label: number }[] }>;
  for (const o of NAMES) {
    const lines = (await readFile(join(dir, OWNERS[o]), 'utf8')).split('\n').map((l) => l.trim()).filter((l) => /\t[01]$/.test(l));
    const records = shuffle(lines, 7).slice(0, limit).map((l) => ({ text: l.slice(0, -2).trim(), label: l.endsWith('1') ? 1 : 0 }));
    const test = [0, 1].flatMap((c) => records.filter((r) => r.label === c).slice(0, testPerClass));
    out[o] = { train: records.filter((r) => !test.includes(r)), test };
  }
  return out;
}

/** ‖ΔW‖-relative gaps of naive A/B averaging and of FFA-LoRA (B averaged, A the global's) from the exact mean of B·A, over all LoRA pairs. */
function loraGaps(global: Float32Array, trained: Float32Array[], weights: number[], layout: Layout): { naive: number; ffa: number } {
  const adapters = trained.map((v, i) => ({ tensors: unflatten(v, layout), weight: weights[i] }));
  const pairs = layout.keys.filter((k) => k.endsWith('lora_A.weight')).map((a) => ({ a, b: a.replace('lora_A', 'lora_B') }));
  const g = unflatten(global, layout);
  const total = weights.reduce((s, w) => s + w, 0);
  let exactSq = 0;
  let naiveSq = 0;
  let ffaSq = 0;
  for (const { a, b } of pairs) {
    const [r, inn] = layout.shapes[layout.keys.indexOf(a)];
    const out = layout.shapes[layout.keys.indexOf(b)][0];
    const prod = (bm: ArrayLike<number>, am: ArrayLike<number>, i: number, j: number) => {
      let s = 0;
      for (let k = 0; k < r; k++) s += bm[i * r + k] * am[k * inn + j];
      return s;
    };
    const mean = (key: string) => Float64Array.from(adapters[0].tensors[key].data, (_, i) => adapters.reduce((s, x) => s + x.weight * x.tensors[key].data[i], 0) / total);
    const meanA = mean(a);
    const meanB = mean(b);
    for (let i = 0; i < out; i++) {
      for (let j = 0; j < inn; j++) {
        const base = prod(g[b].data, g[a].data, i, j);
        const want = adapters.reduce((s, x) => s + x.weight * prod(x.tensors[b].data, x.tensors[a].data, i, j), 0) / total - base;
        exactSq += want ** 2;
        naiveSq += (prod(meanB, meanA, i, j) - base - want) ** 2;
        ffaSq += (prod(meanB, g[a].data, i, j) - base - want) ** 2;
      }
    }
  }
  return { naive: Math.sqrt(naiveSq / exactSq), ffa: Math.sqrt(ffaSq / exactSq) };
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const rounds = flag(args, '--rounds', quick ? 3 : 5);
  const localSteps = flag(args, '--local-steps', quick ? 6 : 12);
  const limit = flag(args, '--records', quick ? 400 : 1000);
  const testPerClass = flag(args, '--test-per-class', quick ? 40 : 100);
  const di = args.indexOf('--data');
  const sources = di >= 0 && di + 1 < args.length ? args[di + 1] : DEFAULT_SOURCES;
  const recipe = { batchSize: 16, lr: flag(args, '--lr', 5e-3), maxGradNorm: 1, weightDecay: 0 };
  const seqLen = 40;
  await initBackend({});
  const data = await splits(sources, limit, testPerClass);
  const loaded = await loadModelFolder(STORIES);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const tokenizer = await loadTokenizer(STORIES);
  const rows = Object.fromEntries(NAMES.map((o) => [o, { train: classifiedRows(tokenizer, data[o].train, seqLen), test: classifiedRows(tokenizer, data[o].test, seqLen) }])) as Record<Owner, { train: ClassifiedRow[]; test: ClassifiedRow[] }>;
  const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] }], { seed: 1 });
  const classifier = new SequenceClassifier({ model, adapter, numLabels: 2, seed: 1 });
  try {
    const params = classifier.trainableVariables();
    const layout = layoutOf(Object.fromEntries([...params].map(([k, v]) => [k, { shape: [...v.shape], data: new Float32Array(v.size) }])));
    const initial = classifier.getFlat();
    const size = initial.length;
    /** `steps` local steps from `from` on an owner's rows; returns the trained values. */
    const train = (from: Float32Array, trainRows: ClassifiedRow[], steps: number, seed: number): Float32Array => {
      classifier.setFlat(from);
      classifier.train(trainRows, { ...recipe, steps, seed });
      return classifier.getFlat();
    };
    const evaluate = (values: Float32Array, owner: Owner): number => {
      classifier.setFlat(values);
      return classifier.accuracy(rows[owner].test);
    };
    const results: { setting: string; owner: Owner; accuracy: number; trainedBy?: Owner }[] = [];
    const log = (line: string) => process.stdout.write(`${line}\n`);
    log(`train rows ${NAMES.map((o) => `${o} ${rows[o].train.length}`).join(', ')}; test rows per owner ${2 * testPerClass} (balanced); ${size} trained values`);

    const total = rounds * localSteps;
    for (const o of NAMES) {
      const v = train(initial, rows[o].train, total, 11);
      for (const t of NAMES) results.push({ setting: 'alone', trainedBy: o, owner: t, accuracy: evaluate(v, t) });
      log(`alone ${o}: ${results.slice(-3).map((r) => r.accuracy.toFixed(3)).join(' ')}`);
    }
    const union = shuffle(NAMES.flatMap((o) => rows[o].train), 3);
    const central = train(initial, union, total * NAMES.length, 11);
    for (const t of NAMES) results.push({ setting: 'centralized', owner: t, accuracy: evaluate(central, t) });
    log(`centralized: ${results.slice(-3).map((r) => r.accuracy.toFixed(3)).join(' ')}`);

    // DP: σ for ε ≈ 8 at δ = 1e-5 over `rounds` rounds with every owner in every round (q = 1).
    const delta = 1e-5;
    let lo = 0.3;
    let hi = 50;
    for (let i = 0; i < 40; i++) {
      const mid = (lo + hi) / 2;
      const a = new RdpAccountant();
      a.compose(mid, 1, rounds);
      if (a.spent(delta).epsilon > 8) lo = mid;
      else hi = mid;
    }
    const sigma = hi;
    const clipNorm = flag(args, '--dp-clip', 0.5);

    const timing: Record<string, { roundSeconds: number[]; secaggSeconds: number[]; bytesPerOwnerPerRound: number }> = {};
    let epsilon = 0;
    const gaps: { naive: number; ffa: number }[] = [];
    const weights = NAMES.map((o) => rows[o].train.length);
    for (const setting of ['fedavg', 'fedavg+secagg', 'fedavg+dp'] as const) {
      let global = initial;
      const t: { roundSeconds: number[]; secaggSeconds: number[]; bytesPerOwnerPerRound: number } = { roundSeconds: [], secaggSeconds: [], bytesPerOwnerPerRound: 0 };
      timing[setting] = t;
      const accountant = new RdpAccountant();
      for (let r = 1; r <= rounds; r++) {
        const t0 = performance.now();
        let crypto = 0;
        const secure = setting === 'fedavg+secagg' ? NAMES.map((o) => new SecAggOwner(o, { round: `bench|${r}`, length: size, threshold: 2, owners: NAMES.length })) : [];
        let shareBytes = 0;
        let boxes: ReturnType<SecAggOwner['shareKeys']> = [];
        const c0 = performance.now();
        const advertised = secure.map((x) => x.advertise());
        if (secure.length) {
          boxes = secure.flatMap((x) => x.shareKeys(advertised));
          shareBytes = (2 * JSON.stringify(boxes).length) / NAMES.length + JSON.stringify(advertised).length;
        }
        crypto += (performance.now() - c0) / 1000;
        const trained = NAMES.map((o, i) => train(global, rows[o].train, localSteps, 100 * r + i));
        const deltas = trained.map((v) => v.map((x, k) => x - global[k]));
        if (setting === 'fedavg') gaps.push(loraGaps(global, trained, weights, layout));
        let mean: Float32Array;
        if (setting === 'fedavg') {
          mean = fedAvg(deltas.map((values, i) => ({ values, weight: weights[i] })));
        } else if (setting === 'fedavg+secagg') {
          const c1 = performance.now();
          const weight = weights.reduce((x, y) => x + y, 0);
          const masked = new Map(secure.map((x, i) => [x.owner, x.maskInput(deltas[i].map((v) => v * weights[i]), boxes.filter((b) => b.to === x.owner))] as const));
          const reveals = secure.map((x) => x.reveal([...masked.keys()]));
          mean = unmaskSum(secure[0].params, advertised, masked, reveals).map((v) => v / weight);
          crypto += (performance.now() - c1) / 1000;
        } else {
          const sum = new Float32Array(size);
          for (const d of deltas) {
            clipUpdate(d, clipNorm);
            d.forEach((v, k) => (sum[k] += v));
          }
          addGaussianNoise(sum, sigma * clipNorm);
          mean = sum.map((v) => v / deltas.length);
          epsilon = accountant.spendRound(sigma, 1, delta, 8.0001).epsilon;
        }
        global = global.map((v, k) => v + mean[k]);
        t.roundSeconds.push((performance.now() - t0) / 1000);
        t.secaggSeconds.push(crypto);
        t.bytesPerOwnerPerRound = 2 * size * 4 + shareBytes;
      }
      for (const o of NAMES) results.push({ setting, owner: o, accuracy: evaluate(global, o) });
      log(`${setting}: ${results.slice(-3).map((r) => r.accuracy.toFixed(3)).join(' ')}`);
    }
    const mean = (xs: number[]) => xs.reduce((x, y) => x + y, 0) / xs.length;
    const avg = (setting: string) => mean(results.filter((r) => r.setting === setting).map((r) => r.accuracy));
    const roundSeconds = mean(timing.fedavg.roundSeconds);
    const secRound = mean(timing['fedavg+secagg'].roundSeconds);
    const secaggOverheadFraction = mean(timing['fedavg+secagg'].secaggSeconds) / secRound;
    // Each owner alone, on the other owners' held-out data, against FedAvg on the same data.
    const aloneOnOthers = NAMES.map((o) => mean(results.filter((r) => r.setting === 'alone' && r.trainedBy === o && r.owner !== o).map((r) => r.accuracy)));
    const fedavgOnOthers = NAMES.map((o) => mean(results.filter((r) => r.setting === 'fedavg' && r.owner !== o).map((r) => r.accuracy)));
    const summary = {
      accuracyByOwnerMean: { alone: avg('alone'), centralized: avg('centralized'), fedavg: avg('fedavg'), 'fedavg+secagg': avg('fedavg+secagg'), 'fedavg+dp': avg('fedavg+dp') },
      aloneOnOtherOwners: Object.fromEntries(NAMES.map((o, i) => [o, { alone: aloneOnOthers[i], fedavg: fedavgOnOthers[i] }])),
      loraAggregation: {
        what: 'per FedAvg round, over all LoRA pairs: ‖ΔW_x − ΔW_exact‖_F / ‖ΔW_exact‖_F, ΔW_exact = mean(B·A) − B_g·A_g (examples-weighted)',
        naiveAveragingOfAandB: gaps.map((g) => g.naive),
        ffaLoraBOnly: gaps.map((g) => g.ffa),
      },
      targets: {
        fedavgWithin5PointsOfCentralized: Math.abs(avg('fedavg') - avg('centralized')) <= 0.05,
        secaggWithin5PointsOfCentralized: Math.abs(avg('fedavg+secagg') - avg('centralized')) <= 0.05,
        fedavgAboveEachAloneOnOthers: NAMES.every((_, i) => fedavgOnOthers[i] > aloneOnOthers[i]),
        secaggOverheadAtMost10Percent: secaggOverheadFraction <= 0.1,
      },
    };
    log(JSON.stringify(summary));
    return {
      model: 'stories260K', adapter: 'lora r=4 q,v + score head (mean-pooled final hidden states)', rounds, localSteps, records: limit, testPerClass, recipe,
      dp: { epsilon, delta, noiseMultiplier: sigma, clipNorm },
      results, roundSeconds, secaggRoundSeconds: secRound, secaggOverheadFraction, bytesPerOwnerPerRound: timing['fedavg+secagg'].bytesPerOwnerPerRound,
      bytesPerOwnerPerRoundPlain: timing.fedavg.bytesPerOwnerPerRound, summary,
      method: 'in-process rounds with model/federation (owners train sequentially); SecAgg overhead = key agreement, Shamir sharing, masking and unmasking time over the SecAgg round time',
    };
  } finally {
    classifier.dispose();
    adapter.dispose();
    model.dispose?.();
  }
}
