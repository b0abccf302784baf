// Compute engines side by side: PyTorch (the anchor, through python3) and every Tandem engine
// that starts here, on the SmolLM-135M shape (random weights) at 1 x 256 and stories260K at
// 4 x 256: forward tokens/s and LoRA-step tokens/s (r 8 on q_proj and v_proj, alpha 16; the
// step is forward, loss, backward to the LoRA parameters and AdamW on them), plus matmul
// GFLOP/s ([1024 x 576] x [576 x 1536]), ORT's per-call cost, and the memory of a SmolLM-shape
// LoRA step at 1 x 512 on ORT (in a child process, so its peak RSS is its own).
//
//   npm run bench -- engine [--quick] [--threads N] [--skip-tfjs] [--all]
//
// --quick: SmolLM's shape with 2 layers. --all: also tfjs's pure-JS cpu backend. The machine may be shared: run it more than once.
import { execFile, spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  ArrayAdamW,
  BACKENDS,
  LlamaModel,
  OrtLlama,
  Rng,
  causalLmLoss,
  createAdapter,
  createOrtMatMul,
  gradients,
  loadModelFolder,
  selectEngine,
  tf,
} from '../model/index.ts';
import { SMOLLM_135M_SHAPE, llamaConfig, randomWeights, useBackend } from '../model/testing.ts';
import type { LoraParams, LoraSpec, ModelConfig } from '../model/index.ts';

const execFileAsync = promisify(execFile);
const print = (line: string): boolean => process.stdout.write(`${line}\n`);

interface Case {
  name: string;
  config: ModelConfig;
  weights: Map<string, { shape: number[]; data: Float32Array }>;
  batch: number;
  seq: number;
  reps: number;
}

interface Row {
  engine: string;
  model: string;
  batch: number;
  seq: number;
  threads: number;
  forwardTokensPerSecond?: number;
  loraStepTokensPerSecond?: number;
  [extra: string]: unknown;
}

async function median(f: () => Promise<void> | void, reps: number): Promise<number> {
  await f();
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await f();
    times.push((performance.now() - t0) / 1000);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

const randomIds = (n: number, vocab: number, seed: number): Int32Array => {
  const rng = new Rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(rng.next() * vocab) % vocab);
};

const LORA_MODULES = ['q_proj', 'v_proj'] as const;

function loraParams(config: ModelConfig, weights: Case['weights'], r: number, seed: number): LoraParams {
  const rng = new Rng(seed);
  const params: LoraParams = new Map();
  for (let i = 0; i < config.numHiddenLayers; i++) {
    for (const m of LORA_MODULES) {
      const path = `model.layers.${i}.self_attn.${m}`;
      const [out, inF] = weights.get(`${path}.weight`)?.shape ?? [0, 0];
      // PEFT's init: A random, B zero.
      params.set(path, { a: Float32Array.from({ length: r * inF }, () => rng.normal() / Math.sqrt(inF)), b: new Float32Array(out * r) });
    }
  }
  return params;
}

/** One ORT LoRA step: engine forward + backward, then AdamW in JS. */
async function ortLoraStep(engine: OrtLlama, ids: Int32Array, c: Case, spec: LoraSpec, params: LoraParams, opt: ArrayAdamW): Promise<number> {
  const { loss, grads } = await engine.loraStep(ids, ids, c.batch, c.seq, spec, params);
  const p = new Map<string, Float32Array>();
  const g = new Map<string, Float32Array>();
  for (const [path, v] of params) {
    p.set(`${path}.a`, v.a);
    p.set(`${path}.b`, v.b);
    const gv = grads.get(path);
    if (gv) {
      g.set(`${path}.a`, gv.a);
      g.set(`${path}.b`, gv.b);
    }
  }
  opt.apply(p, g);
  return loss;
}

async function runOrt(engineName: string, provider: 'cpu' | 'cuda', c: Case, threads: number): Promise<Row> {
  const row: Row = { engine: engineName, model: c.name, batch: c.batch, seq: c.seq, threads };
  const engine = await OrtLlama.create(c.config, c.weights, { threads, provider });
  try {
    const ids = randomIds(c.batch * c.seq, c.config.vocabSize, 7);
    const t0 = performance.now();
    await engine.logits(ids, c.batch, c.seq);
    row.forwardSessionBuildSeconds = (performance.now() - t0) / 1000;
    row.forwardTokensPerSecond = (c.batch * c.seq) / (await median(() => engine.logits(ids, c.batch, c.seq).then(() => undefined), c.reps));
    const spec: LoraSpec = { r: 8, scaling: 16 / 8, modules: LORA_MODULES };
    const params = loraParams(c.config, c.weights, 8, 3);
    const opt = new ArrayAdamW({ lr: 1e-4 });
    row.loraStepTokensPerSecond = (c.batch * c.seq) / (await median(() => ortLoraStep(engine, ids, c, spec, params, opt).then(() => undefined), c.reps));
  } finally {
    await engine.dispose();
  }
  return row;
}

function runTfjs(backend: string, c: Case, threads: number): Row {
  const row: Row = { engine: `tfjs-${backend}`, model: c.name, batch: c.batch, seq: c.seq, threads: backend === 'wasm' || backend === 'cpu' ? 1 : threads };
  const model = LlamaModel.fromArrays(c.config, c.weights);
  const ids = tf.tensor2d(randomIds(c.batch * c.seq, c.config.vocabSize, 7), [c.batch, c.seq], 'int32');
  try {
    const timeSync = (f: () => void, reps: number): number => {
      f();
      const times: number[] = [];
      for (let i = 0; i < reps; i++) {
        const t0 = performance.now();
        f();
        times.push((performance.now() - t0) / 1000);
      }
      times.sort((a, b) => a - b);
      return times[Math.floor(times.length / 2)];
    };
    row.forwardTokensPerSecond = (c.batch * c.seq) / timeSync(() => tf.tidy(() => void model.forward(ids).dataSync()), c.reps);
    const adapter = createAdapter(model, [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: [...LORA_MODULES] }], { seed: 0 });
    const vars = [...adapter.trainableVariables().values()];
    try {
      row.loraStepTokensPerSecond =
        (c.batch * c.seq) /
        timeSync(() => {
          const { value, grads } = gradients(() => causalLmLoss(model.forward(ids, { hooks: adapter.hooks, training: true }), ids).loss, vars);
          value.dataSync();
          tf.dispose([value, ...grads.filter((g): g is tf.Tensor => g !== undefined)]);
        }, c.reps);
    } finally {
      adapter.dispose();
    }
  } catch (err) {
    row.error = (err as Error).message.split('\n')[0].slice(0, 200);
  } finally {
    ids.dispose();
    model.dispose();
  }
  return row;
}

/** The PyTorch anchor, or why it was skipped. */
async function runPytorch(cases: Case[], threads: number): Promise<{ rows: Row[]; matmulGflops?: number; torch?: string; skipped?: string }> {
  const pythons = ['python3', '/usr/bin/python3'];
  const python = pythons.find((p) => spawnSync(p, ['-c', 'import torch'], { stdio: 'ignore' }).status === 0);
  if (!python) {
    const skipped = 'torch is not importable by python3; on Debian: sudo apt-get install python3-torch libopenblas0-pthread';
    print(`pytorch: skipped (${skipped})`);
    return { rows: [], skipped };
  }
  const env = { ...process.env };
  // The machine's OpenBLAS tuning variables mislead the Debian build; unset for this process only.
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  const spec = cases.map((c) => ({
    name: c.name,
    hidden: c.config.hiddenSize,
    intermediate: c.config.intermediateSize,
    heads: c.config.numAttentionHeads,
    kvHeads: c.config.numKeyValueHeads,
    vocab: c.config.vocabSize,
    layers: c.config.numHiddenLayers,
    batch: c.batch,
    seq: c.seq,
    reps: c.reps,
  }));
  const { stdout } = await execFileAsync(python, [join(import.meta.dirname, 'engine-pytorch.py'), JSON.stringify(spec), String(threads)], { env, maxBuffer: 1 << 20 });
  const rows: Row[] = [];
  let matmulGflops: number | undefined;
  let torch: string | undefined;
  for (const line of stdout.split('\n').filter(Boolean)) {
    const r = JSON.parse(line) as Record<string, unknown>;
    if (r.kind === 'matmul') {
      matmulGflops = r.gflops as number;
      torch = r.torch as string;
    } else {
      rows.push({
        engine: 'pytorch',
        model: r.name as string,
        batch: r.batch as number,
        seq: r.seq as number,
        threads,
        forwardTokensPerSecond: r.forwardTokensPerSecond as number,
        loraStepTokensPerSecond: r.loraStepTokensPerSecond as number,
      });
    }
  }
  return { rows, matmulGflops, torch };
}

const MM = { m: 1024, k: 576, n: 1536 };

async function ortMatmul(threads: number, provider: 'cpu' | 'cuda'): Promise<{ gflops: number; callMicroseconds: number }> {
  const w = Float32Array.from({ length: MM.k * MM.n }, (_, i) => Math.sin(i));
  const x = Float32Array.from({ length: MM.m * MM.k }, (_, i) => Math.cos(i));
  const mm = await createOrtMatMul(w, MM.k, MM.n, { threads, provider });
  try {
    const s = await median(async () => void (await mm.run(x, MM.m)), 20);
    // A one-row call: what routing each tfjs kernel to ORT would pay per kernel besides the math.
    const one = x.subarray(0, MM.k);
    const single = await median(async () => void (await mm.run(one, 1)), 200);
    return { gflops: (2 * MM.m * MM.k * MM.n) / s / 1e9, callMicroseconds: single * 1e6 };
  } finally {
    await mm.release();
  }
}

function tfjsMatmul(): number {
  const a = tf.randomNormal([MM.m, MM.k]);
  const b = tf.randomNormal([MM.k, MM.n]);
  const f = (): void => {
    tf.tidy(() => {
      tf.matMul(a, b).dataSync();
    });
  };
  f();
  const times: number[] = [];
  for (let i = 0; i < 10; i++) {
    const t0 = performance.now();
    f();
    times.push((performance.now() - t0) / 1000);
  }
  tf.dispose([a, b]);
  times.sort((x, y) => x - y);
  return (2 * MM.m * MM.k * MM.n) / times[5] / 1e9;
}

/** The SmolLM-shape LoRA step at 1 x 512 on ORT, in a child process: its peak RSS. */
function memoryCheck(quick: boolean, threads: number): Record<string, unknown> {
  const child = spawnSync(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '_engine-memory.ts'), quick ? '2' : String(SMOLLM_135M_SHAPE.layers), '512', String(threads)], {
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  const last = child.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(last) as Record<string, unknown>;
  } catch {
    return { error: (child.stderr || child.stdout).split('\n').slice(-3).join(' ').slice(0, 300) };
  }
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const skipTfjs = args.includes('--skip-tfjs');
  const all = args.includes('--all');
  const ti = args.indexOf('--threads');
  const threads = ti >= 0 ? Number(args[ti + 1]) : availableParallelism();
  if (!Number.isInteger(threads) || threads < 1 || threads > 1024) {
    process.stderr.write(`--threads must be an integer in [1, 1024], got ${JSON.stringify(args[ti + 1])}\n`);
    process.exit(2);
  }
  const stories = await loadModelFolder(join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K'));
  const smolConfig = llamaConfig({ ...SMOLLM_135M_SHAPE, layers: quick ? 2 : SMOLLM_135M_SHAPE.layers });
  const cases: Case[] = [
    { name: quick ? 'smollm-135m-shape-2-layers' : 'smollm-135m-shape', config: smolConfig, weights: randomWeights(smolConfig, 1), batch: 1, seq: 256, reps: 3 },
    { name: 'stories260K', config: stories.config, weights: stories.weights, batch: 4, seq: 256, reps: 5 },
  ];
  const rows: Row[] = [];
  const matmul: Record<string, unknown>[] = [];
  const line = (r: Row): void => {
    rows.push(r);
    const f = (v: unknown): string => (typeof v === 'number' ? v.toFixed(0).padStart(6) : '     -');
    print(
      `${r.engine.padEnd(15)} ${r.model.padEnd(27)} ${r.batch} x ${r.seq}  threads ${r.threads}  forward ${f(r.forwardTokensPerSecond)} tok/s  lora step ${f(r.loraStepTokensPerSecond)} tok/s${r.error ? `  [${String(r.error)}]` : ''}`,
    );
  };

  const torch = await runPytorch(cases, threads);
  torch.rows.forEach(line);
  if (torch.matmulGflops !== undefined) {
    matmul.push({ engine: 'pytorch', threads, gflops: torch.matmulGflops });
    print(`pytorch ${torch.torch} matmul ${torch.matmulGflops.toFixed(0)} GFLOP/s (${threads} threads)`);
  }

  const choice = await selectEngine({ threads, log: (l) => print(l) });
  const ortProviders: ['ort-cpu' | 'ort-cuda', 'cpu' | 'cuda'][] = [['ort-cpu', 'cpu']];
  if (choice.name === 'ort-cuda') ortProviders.unshift(['ort-cuda', 'cuda']);
  for (const [name, provider] of ortProviders) {
    for (const t of [...new Set([1, threads])]) {
      const mm = await ortMatmul(t, provider);
      matmul.push({ engine: name, threads: t, gflops: mm.gflops, oneRowCallMicroseconds: mm.callMicroseconds });
      print(`${name} matmul ${mm.gflops.toFixed(0)} GFLOP/s (${t} threads); a one-row call ${mm.callMicroseconds.toFixed(0)} µs`);
    }
    for (const c of cases) line(await runOrt(name, provider, c, threads));
  }

  if (!skipTfjs) {
    for (const backend of BACKENDS) {
      if (backend === 'cpu' && !all) {
        print('tfjs-cpu: skipped (the pure-JS backend needs tens of minutes here; --all runs it)');
        continue;
      }
      try {
        await useBackend(backend);
      } catch (err) {
        print(`tfjs-${backend}: not available (${(err as Error).message.split('\n')[0].slice(0, 100)})`);
        continue;
      }
      const gf = tfjsMatmul();
      matmul.push({ engine: `tfjs-${backend}`, threads: backend === 'wasm' || backend === 'cpu' ? 1 : threads, gflops: gf });
      print(`tfjs-${backend} matmul ${gf.toFixed(1)} GFLOP/s`);
      for (const c of cases) {
        line(runTfjs(backend, c, threads));
      }
    }
  }

  const memory = memoryCheck(quick, threads);
  print(`memory: ort-cpu LoRA step, ${cases[0].name} at 1 x 512: ${JSON.stringify(memory)}`);

  const ratios: Record<string, number> = {};
  const anchor = rows.find((r) => r.engine === 'pytorch' && r.model === cases[0].name);
  const best = rows.filter((r) => r.engine !== 'pytorch' && r.model === cases[0].name);
  if (anchor && best.length) {
    const bf = Math.max(...best.map((r) => r.forwardTokensPerSecond ?? 0));
    const bl = Math.max(...best.map((r) => r.loraStepTokensPerSecond ?? 0));
    ratios.forwardVsPytorch = bf / (anchor.forwardTokensPerSecond ?? 1);
    ratios.loraStepVsPytorch = bl / (anchor.loraStepTokensPerSecond ?? 1);
    print(`best Tandem engine vs PyTorch on ${cases[0].name}: forward ${ratios.forwardVsPytorch.toFixed(2)}x, LoRA step ${ratios.loraStepVsPytorch.toFixed(2)}x`);
  }
  return { rows, matmul, memory, ratios, pytorch: torch.skipped ? { skipped: torch.skipped } : { version: torch.torch }, engine: choice.name };
}
