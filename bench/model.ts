// Forward and training-step throughput of the LLaMA implementation, per backend, on the
// shipped stories260K and on a random model of SmolLM-135M's shape. Training steps: LoRA
// (r 8 on every linear layer: what Tandem trains) and full fine-tuning (every weight).
//
//   npm run bench -- model [--quick] [--all]
//
// --quick: SmolLM's shape with 2 layers. --all: also the SmolLM shape on the pure-JS cpu
// backend (tens of minutes). Runs are ordered by memory: wasm's heap stops at 4 GiB, and a
// failed allocation aborts the module, so after a failure the rest of that backend is skipped.
import { join } from 'node:path';
import { BACKENDS, causalLmLoss, gradients, createAdapter, LlamaModel, loadModelFolder, tf } from '../model/index.ts';
import { llamaConfig, randomWeights, SMOLLM_135M_SHAPE, useBackend } from '../model/testing.ts';
import type { ModelConfig } from '../model/index.ts';

interface Case {
  name: string;
  config: ModelConfig;
  weights: Map<string, { shape: number[]; data: Float32Array }>;
  batch: number;
  seqs: number[];
  reps: number;
}

/** Median seconds of `reps` runs after a profiled warm-up run, and that run's peak tensor bytes as tfjs counts them. */
async function measure(f: () => void, reps: number): Promise<{ seconds: number; peakTensorBytes: number }> {
  const { peakBytes } = await tf.profile(() => f());
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    f();
    times.push((performance.now() - t0) / 1000);
  }
  times.sort((a, b) => a - b);
  return { seconds: times[Math.floor(times.length / 2)], peakTensorBytes: peakBytes };
}

/** Bytes the backend holds outside tfjs's count: wasm's heap (it only grows, so this is its peak so far). */
function backendBytes(): number | undefined {
  const wasm = (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm;
  return wasm?.HEAPU8?.buffer.byteLength;
}

const mib = (b: number | undefined): string => (b === undefined ? '-' : `${(b / 2 ** 20).toFixed(0)} MiB`);

/** Runs one measurement unless the backend already failed; returns the failure, if any, for the next ones. */
async function attempt(row: Record<string, unknown>, label: string, step: () => Promise<void>, aborted: string | undefined): Promise<string | undefined> {
  if (aborted) {
    row[`${label} skipped`] = aborted;
    return aborted;
  }
  try {
    await step();
    return undefined;
  } catch (err) {
    const message = (err as Error).message.split('\n')[0];
    row[`${label} error`] = message.slice(0, 200);
    return `${String(row.backend)} failed earlier: ${message.slice(0, 120)}`;
  }
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const all = args.includes('--all');
  const stories = await loadModelFolder(join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K'));
  const smolConfig = llamaConfig({ ...SMOLLM_135M_SHAPE, layers: quick ? 2 : SMOLLM_135M_SHAPE.layers });
  const smolWeights = randomWeights(smolConfig, 1);
  const cases: Case[] = [
    { name: 'stories260K', config: stories.config, weights: stories.weights, batch: 4, seqs: [256], reps: 5 },
    { name: quick ? 'smollm-135m-shape-2-layers' : 'smollm-135m-shape', config: smolConfig, weights: smolWeights, batch: 1, seqs: [128, 256], reps: 1 },
  ];
  const rows: Record<string, unknown>[] = [];
  const print = (line: string): boolean => process.stdout.write(`${line}\n`);
  for (const backend of BACKENDS) {
    try {
      await useBackend(backend);
    } catch (err) {
      print(`${backend}: not available (${(err as Error).message.split('\n')[0].slice(0, 100)})`);
      continue;
    }
    let aborted: string | undefined;
    for (const c of cases) {
      if (backend === 'cpu' && c.config.numHiddenLayers * c.config.hiddenSize > 10_000 && !all) {
        print(`cpu      ${c.name}: skipped (the pure-JS backend needs tens of minutes here; --all runs it)`);
        continue;
      }
      const model = LlamaModel.fromArrays(c.config, c.weights);
      const fullSteps: { row: Record<string, unknown>; seq: number; ids: tf.Tensor2D; step: () => Promise<void> }[] = [];
      for (const seq of c.seqs) {
        const row: Record<string, unknown> = { backend, model: c.name, parameters: [...model.weights.values()].reduce((n, v) => n + v.size, 0), batch: c.batch, seq };
        rows.push(row);
        const tokens = c.batch * seq;
        const ids = tf.randomUniform([c.batch, seq], 0, c.config.vocabSize, 'int32') as tf.Tensor2D;
        const steps: [string, () => Promise<void>][] = [
          ['forward', async () => {
            const r = await measure(() => tf.tidy(() => void model.forward(ids).dataSync()), c.reps);
            Object.assign(row, { forwardTokensPerSecond: tokens / r.seconds, forwardPeakTensorBytes: r.peakTensorBytes });
          }],
          ['lora step', async () => {
            const adapter = createAdapter(model, [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: 'all-linear' }], { seed: 0 });
            const vars = [...adapter.trainableVariables().values()];
            try {
              const r = await measure(() => {
                const { value, grads } = gradients(() => causalLmLoss(model.forward(ids, { hooks: adapter.hooks, training: true }), ids).loss, vars);
                value.dataSync();
                tf.dispose([value, ...grads.filter((g): g is tf.Tensor => g !== undefined)]);
              }, c.reps);
              Object.assign(row, { loraParameters: vars.reduce((n, v) => n + v.size, 0), loraStepTokensPerSecond: tokens / r.seconds, loraStepPeakTensorBytes: r.peakTensorBytes });
            } finally {
              adapter.dispose();
            }
          }],
          ['full fine-tuning step', async () => {
            const vars = [...model.weights.values()];
            for (const v of vars) v.trainable = true;
            try {
              const r = await measure(() => {
                const { value, grads } = gradients(() => causalLmLoss(model.forward(ids, { training: true }), ids).loss, vars);
                value.dataSync();
                tf.dispose([value, ...grads.filter((g): g is tf.Tensor => g !== undefined)]);
              }, c.reps);
              Object.assign(row, { fullStepTokensPerSecond: tokens / r.seconds, fullStepPeakTensorBytes: r.peakTensorBytes });
            } finally {
              for (const v of vars) v.trainable = false;
            }
          }],
        ];
        // Full fine-tuning needs the most memory: it runs after every sequence length's other steps.
        fullSteps.push({ row, seq, ids, step: steps[2][1] });
        for (const [label, step] of steps.slice(0, 2)) aborted = await attempt(row, label, step, aborted);
      }
      for (const { row, step } of fullSteps) aborted = await attempt(row, 'full fine-tuning step', step, aborted);
      for (const { row, seq, ids } of fullSteps) {
        row.backendHeapBytes = backendBytes();
        row.rssBytes = process.memoryUsage().rss;
        const f = (k: string): string => (typeof row[k] === 'number' ? (row[k] as number).toFixed(0).padStart(7) : '      -');
        const failed = Object.entries(row).find(([k]) => k.endsWith(' error') || k.endsWith(' skipped'));
        print(
          `${backend.padEnd(8)} ${c.name.padEnd(27)} seq ${String(seq).padEnd(4)} forward ${f('forwardTokensPerSecond')} tok/s  lora step ${f('loraStepTokensPerSecond')} tok/s  full step ${f('fullStepTokensPerSecond')} tok/s  peak tensors ${mib(row.loraStepPeakTensorBytes as number | undefined)} (lora)  heap ${mib(row.backendHeapBytes as number | undefined)}  rss ${mib(row.rssBytes as number)}${failed ? `  [${failed[0]}: ${String(failed[1])}]` : ''}`,
        );
        if (!aborted) ids.dispose();
      }
      if (!aborted) model.dispose();
    }
  }
  return { rows };
}
