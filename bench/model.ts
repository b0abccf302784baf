// Forward and training-step throughput of the LLaMA implementation, per backend, on the
// shipped stories260K and on a random model of SmolLM-135M's shape. Two training steps:
// LoRA (r 8, all linear layers: what Tandem trains) and full fine-tuning (every weight).
import { join } from 'node:path';
import { BACKENDS, causalLmLoss, createAdapter, LlamaModel, llamaConfig, loadModelFolder, randomWeights, SMOLLM_135M_SHAPE, tf, useBackend } from '../model/index.ts';
import type { ModelConfig } from '../model/index.ts';

interface Case {
  name: string;
  config: ModelConfig;
  weights: Map<string, { shape: number[]; data: Float32Array }>;
  batch: number;
  seq: number;
  reps: number;
}

/** Median seconds of `reps` runs after a profiled warm-up run, and that run's peak tensor bytes. */
async function measure(f: () => void, reps: number): Promise<{ seconds: number; peakBytes: number }> {
  const { peakBytes } = await tf.profile(() => f());
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    f();
    times.push((performance.now() - t0) / 1000);
  }
  times.sort((a, b) => a - b);
  return { seconds: times[Math.floor(times.length / 2)], peakBytes };
}

function trainStep(model: LlamaModel, ids: tf.Tensor2D, vars: tf.Variable[], hooks?: Parameters<LlamaModel['forward']>[1]): void {
  const { value, grads } = tf.variableGrads(() => causalLmLoss(model.forward(ids, { ...hooks, training: true }), ids).loss, vars);
  value.dataSync();
  tf.dispose([value, ...Object.values(grads)]);
}

const mib = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MiB`;

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const stories = await loadModelFolder(join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K'));
  const smolConfig = llamaConfig({ ...SMOLLM_135M_SHAPE, layers: quick ? 2 : SMOLLM_135M_SHAPE.layers });
  const cases: Case[] = [
    { name: 'stories260K', config: stories.config, weights: stories.weights, batch: 4, seq: 256, reps: 5 },
    { name: quick ? 'smollm-135m-shape-2-layers' : 'smollm-135m-shape', config: smolConfig, weights: randomWeights(smolConfig, 1), batch: 1, seq: 256, reps: 1 },
  ];
  const rows: Record<string, unknown>[] = [];
  for (const backend of BACKENDS) {
    try {
      await useBackend(backend);
    } catch (err) {
      process.stdout.write(`${backend}: not available (${(err as Error).message.split('\n')[0].slice(0, 80)})\n`);
      continue;
    }
    const pending: (() => Promise<void>)[] = [];
    for (const c of cases) {
      const model = LlamaModel.fromArrays(c.config, c.weights);
      const ids = tf.randomUniform([c.batch, c.seq], 0, c.config.vocabSize, 'int32') as tf.Tensor2D;
      const tokens = c.batch * c.seq;
      const fwd = await measure(() => tf.tidy(() => void model.forward(ids).dataSync()), c.reps);
      const adapter = createAdapter(model, [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: 'all-linear' }], { seed: 0 });
      const loraVars = [...adapter.trainableVariables().values()];
      const lora = await measure(() => trainStep(model, ids, loraVars, { hooks: adapter.hooks }), c.reps);
      adapter.dispose();
      const row: Record<string, unknown> = {
        backend,
        model: c.name,
        parameters: [...model.weights.values()].reduce((n, v) => n + v.size, 0),
        loraParameters: loraVars.reduce((n, v) => n + v.size, 0),
        batch: c.batch,
        seq: c.seq,
        forwardTokensPerSecond: tokens / fwd.seconds,
        forwardPeakTensorBytes: fwd.peakBytes,
        loraStepTokensPerSecond: tokens / lora.seconds,
        loraStepPeakTensorBytes: lora.peakBytes,
      };
      rows.push(row);
      process.stdout.write(
        `${backend.padEnd(8)} ${c.name.padEnd(28)} forward ${(tokens / fwd.seconds).toFixed(0).padStart(7)} tok/s (peak ${mib(fwd.peakBytes)})  lora step ${(tokens / lora.seconds).toFixed(0).padStart(7)} tok/s (peak ${mib(lora.peakBytes)})\n`,
      );
      // Full fine-tuning last: on wasm it can exhaust the 4 GiB heap, which ends that backend's module.
      pending.push(async () => {
        const vars = [...model.weights.values()];
        for (const v of vars) v.trainable = true;
        try {
          const full = await measure(() => trainStep(model, ids, vars), c.reps);
          row.fullStepTokensPerSecond = tokens / full.seconds;
          row.fullStepPeakTensorBytes = full.peakBytes;
          process.stdout.write(`${backend.padEnd(8)} ${c.name.padEnd(28)} full fine-tuning step ${(tokens / full.seconds).toFixed(0).padStart(7)} tok/s (peak ${mib(full.peakBytes)})\n`);
        } catch (err) {
          row.fullStepError = (err as Error).message.split('\n')[0].slice(0, 200);
          process.stdout.write(`${backend.padEnd(8)} ${c.name.padEnd(28)} full fine-tuning step failed: ${row.fullStepError}\n`);
        }
        row.rssBytes = process.memoryUsage().rss;
        tf.dispose(ids);
        model.dispose();
      });
    }
    for (const p of pending) await p();
  }
  return { rows };
}
