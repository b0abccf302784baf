// Federation of three real non-IID data owners: the amazon, imdb and yelp sources of the
// UCI sentiment-labelled-sentences data, each with a held-out test split, fine-tuning LoRA on
// stories260K as a label-word classifier. Accuracy on each owner's held-out data for: each
// owner alone, centralized training on the union, FedAvg, FedAvg + SecAgg and FedAvg + DP at
// ε ≈ 8; bytes per owner per round, round time and SecAgg's share of it.
//
//   npm run bench -- federation [--rounds N] [--local-steps N] [--quick]
//
// The rounds run in this process with the federation math of model/federation and the edge's
// one training run (the REST path is covered by test/cloud-node/federation.test.ts); owners
// train one after another, so a round's time is the sum of the owners' local training plus
// aggregation, and SecAgg's share is its compute (keys, shares, masking, unmasking) over that.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readAdapterFolder, writeAdapterFolder } from '../edge-client/index.ts';
import {
  DEFAULT_RECIPE, LlamaModel, RdpAccountant, SecAggOwner, addGaussianNoise, clipUpdate, createAdapter, evaluateLocal, fedAvg, initBackend,
  loadModelFolder, loadTokenizer, runTraining, saveAdapter, unmaskSum,
} from '../model/index.ts';
import type { TrainRecipe } from '../model/index.ts';
import { decodeFloat32, encodeFloat32 } from '../protocol/index.ts';
import type { WireAdapter } from '../protocol/index.ts';

const root = join(import.meta.dirname, '..');
const STORIES = join(root, 'test', 'fixtures', 'stories260K');
const SOURCES = join(root, '..', 'shared', 'fixtures', 'data', 'sentiment-labelled-sentences');
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

/** Train and test files per owner: "sentence\tlabel" lines as {"text","label"} records, 20% held out. */
async function splits(dir: string, limit: number): Promise<Record<Owner, { train: string; test: string; trainRows: number }>> {
  const out = {} as Record<Owner, { train: string; test: string; trainRows: number }>;
  for (const o of NAMES) {
    const lines = (await readFile(join(SOURCES, OWNERS[o]), 'utf8')).split('\n').map((l) => l.trim()).filter((l) => /\t[01]$/.test(l));
    const records = shuffle(lines, 7).slice(0, limit).map((l) => ({ text: `Review: ${l.slice(0, -2).trim()} Sentiment:`, label: l.endsWith('1') ? ' positive' : ' negative' }));
    const cut = Math.floor(records.length * 0.8);
    const write = async (name: string, rs: typeof records) => {
      const f = join(dir, `${o}-${name}.jsonl`);
      await writeFile(f, `${rs.map((r) => JSON.stringify(r)).join('\n')}\n`);
      return f;
    };
    out[o] = { train: await write('train', records.slice(0, cut)), test: await write('test', records.slice(cut)), trainRows: cut };
  }
  return out;
}

function flat(adapter: WireAdapter): Float32Array {
  const parts = Object.keys(adapter.tensors).sort().map((k) => decodeFloat32(adapter.tensors[k].data)!);
  const v = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    v.set(p, o);
    o += p.length;
  }
  return v;
}

function withValues(adapter: WireAdapter, v: Float32Array): WireAdapter {
  const tensors: WireAdapter['tensors'] = {};
  let o = 0;
  for (const k of Object.keys(adapter.tensors).sort()) {
    const n = adapter.tensors[k].shape.reduce((a, b) => a * b, 1);
    tensors[k] = { shape: adapter.tensors[k].shape, data: encodeFloat32(v.subarray(o, o + n)) };
    o += n;
  }
  return { config: adapter.config, tensors };
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const rounds = flag(args, '--rounds', quick ? 3 : 6);
  const localSteps = flag(args, '--local-steps', quick ? 4 : 10);
  const limit = flag(args, '--records', quick ? 300 : 1000);
  await initBackend({});
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-fed-'));
  try {
    const data = await splits(work, limit);
    const loaded = await loadModelFolder(STORIES);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const tokenizer = await loadTokenizer(STORIES);
    const recipe: Omit<TrainRecipe, 'steps'> = { ...DEFAULT_RECIPE, batchSize: 8, seqLen: 48, lr: 3e-3, warmupSteps: 0, schedule: 'constant', valFraction: 0, pack: false, maxGradNorm: 1 };
    const initDir = join(work, 'init');
    const init = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] }], { seed: 1 });
    await saveAdapter(init, initDir);
    init.dispose();
    const initial = await readAdapterFolder(initDir);
    const size = flat(initial).length;

    let seq = 0;
    /** Trains `steps` from a wire adapter on a file; returns the trained flat values. */
    const train = async (from: WireAdapter, file: string, steps: number, seed: number): Promise<Float32Array> => {
      const dir = join(work, `a${seq++}`);
      await writeAdapterFolder(from, dir);
      const r = await runTraining({ model, tokenizer, modelHash: loaded.contentHash, dataFile: file, baseModel: STORIES, recipe: { ...recipe, steps, seed }, methods: [], adapterDir: dir, evaluate: false });
      await rm(dir, { recursive: true, force: true });
      return Float32Array.from(Object.keys(from.tensors).sort().flatMap((k) => [...r.adapter.get(k)!.data]));
    };
    const evaluate = async (values: Float32Array, owner: Owner): Promise<number> => {
      const dir = join(work, `e${seq++}`);
      await writeAdapterFolder(withValues(initial, values), dir);
      const r = await evaluateLocal({ modelDir: STORIES, adapterDir: dir, dataFile: data[owner].test, seqLen: 48, batchSize: 32 });
      await rm(dir, { recursive: true, force: true });
      return r.accuracy ?? NaN;
    };
    const results: { setting: string; owner: Owner; accuracy: number; trainedBy?: Owner }[] = [];
    const log = (s: string) => process.stdout.write(`${s}\n`);

    const total = rounds * localSteps;
    for (const o of NAMES) {
      const v = await train(initial, data[o].train, total, 11);
      for (const t of NAMES) results.push({ setting: 'alone', trainedBy: o, owner: t, accuracy: await evaluate(v, t) });
      log(`alone ${o}: ${NAMES.map((t) => results.at(-3 + NAMES.indexOf(t))!.accuracy.toFixed(3)).join(' ')}`);
    }
    const unionFile = join(work, 'union.jsonl');
    await writeFile(unionFile, (await Promise.all(NAMES.map((o) => readFile(data[o].train, 'utf8')))).join(''));
    const central = await train(initial, unionFile, total * NAMES.length, 11);
    for (const t of NAMES) results.push({ setting: 'centralized', owner: t, accuracy: await evaluate(central, t) });

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
    const clipNorm = 0.05;

    const timing: Record<string, { roundSeconds: number[]; secaggSeconds: number[]; bytesPerOwnerPerRound: number }> = {};
    let epsilon = 0;
    for (const setting of ['fedavg', 'fedavg+secagg', 'fedavg+dp'] as const) {
      let global = flat(initial);
      const t: { roundSeconds: number[]; secaggSeconds: number[]; bytesPerOwnerPerRound: number } = { roundSeconds: [], secaggSeconds: [], bytesPerOwnerPerRound: 0 };
      timing[setting] = t;
      const accountant = new RdpAccountant();
      for (let r = 1; r <= rounds; r++) {
        const t0 = performance.now();
        let crypto = 0;
        const wire = withValues(initial, global);
        const secure = setting === 'fedavg+secagg' ? NAMES.map((o) => new SecAggOwner(o, { round: `bench|${r}`, length: size, threshold: 2, owners: NAMES.length })) : [];
        let shareBytes = 0;
        let boxes: ReturnType<SecAggOwner['shareKeys']> = [];
        const advertised = secure.map((s) => s.advertise());
        if (secure.length) {
          const c0 = performance.now();
          boxes = secure.flatMap((s) => s.shareKeys(advertised));
          crypto += (performance.now() - c0) / 1000;
          shareBytes = (2 * JSON.stringify(boxes).length) / NAMES.length + JSON.stringify(advertised).length;
        }
        const deltas: Float32Array[] = [];
        for (const [i, o] of NAMES.entries()) {
          const trained = await train(wire, data[o].train, localSteps, 100 * r + i);
          deltas.push(trained.map((v, k) => v - global[k]));
        }
        let mean: Float32Array;
        if (setting === 'fedavg') {
          mean = fedAvg(deltas.map((values, i) => ({ values, weight: data[NAMES[i]].trainRows })));
        } else if (setting === 'fedavg+secagg') {
          const c0 = performance.now();
          const weight = NAMES.reduce((s, o) => s + data[o].trainRows, 0);
          const masked = new Map(secure.map((s, i) => [s.owner, s.maskInput(deltas[i].map((v) => v * data[NAMES[i]].trainRows), boxes.filter((b) => b.to === s.owner))] as const));
          const reveals = secure.map((s) => s.reveal([...masked.keys()]));
          mean = unmaskSum(secure[0].params, advertised, masked, reveals).map((v) => v / weight);
          crypto += (performance.now() - c0) / 1000;
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
      for (const o of NAMES) results.push({ setting, owner: o, accuracy: await evaluate(global, o) });
      log(`${setting}: ${NAMES.map((o) => results.at(-3 + NAMES.indexOf(o))!.accuracy.toFixed(3)).join(' ')}`);
    }
    const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
    const avg = (setting: string) => mean(results.filter((r) => r.setting === setting).map((r) => r.accuracy));
    const roundSeconds = mean(timing.fedavg.roundSeconds);
    const secRound = mean(timing['fedavg+secagg'].roundSeconds);
    const secaggOverheadFraction = mean(timing['fedavg+secagg'].secaggSeconds) / secRound;
    const aloneOnOthers = NAMES.map((o) => mean(results.filter((r) => r.setting === 'alone' && r.trainedBy === o && r.owner !== o).map((r) => r.accuracy)));
    const summary = {
      accuracyByOwnerMean: { alone: avg('alone'), centralized: avg('centralized'), fedavg: avg('fedavg'), 'fedavg+secagg': avg('fedavg+secagg'), 'fedavg+dp': avg('fedavg+dp') },
      aloneOnOtherOwnersMean: mean(aloneOnOthers),
      targets: {
        fedavgWithin5PointsOfCentralized: Math.abs(avg('fedavg') - avg('centralized')) <= 0.05,
        secaggWithin5PointsOfCentralized: Math.abs(avg('fedavg+secagg') - avg('centralized')) <= 0.05,
        fedavgAboveAloneOnOthers: avg('fedavg') > mean(aloneOnOthers),
        secaggOverheadAtMost10Percent: secaggOverheadFraction <= 0.1,
      },
    };
    log(JSON.stringify(summary));
    return {
      model: 'stories260K', adapter: 'lora r=4 q,k,v,o', rounds, localSteps, records: limit, dp: { epsilon, delta, noiseMultiplier: sigma, clipNorm },
      results, roundSeconds, secaggRoundSeconds: secRound, secaggOverheadFraction, bytesPerOwnerPerRound: timing['fedavg+secagg'].bytesPerOwnerPerRound,
      bytesPerOwnerPerRoundPlain: timing.fedavg.bytesPerOwnerPerRound, summary,
      method: 'in-process rounds with model/federation (owners train sequentially); SecAgg overhead = key agreement, Shamir sharing, masking and unmasking time over the SecAgg round time',
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
