// Forward and training-step throughput of the LLaMA implementation, per backend, on the
// shipped stories260K and on a random model of SmolLM-135M's shape.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { BACKENDS, causalLmLoss, LlamaModel, llamaConfig, loadModelFolder, randomWeights, SMOLLM_135M_SHAPE, tf, useBackend } from '../model/index.ts';
import type { ModelConfig } from '../model/index.ts';

interface Case {
  name: string;
  config: ModelConfig;
  weights: Map<string, { shape: number[]; data: Float32Array }>;
  batch: number;
  seq: number;
}

function seconds<T>(f: () => T): [T, number] {
  const t0 = performance.now();
  const r = f();
  return [r, (performance.now() - t0) / 1000];
}

/** Median of `reps` timed runs after one warm-up; also the peak tensor bytes of one run. */
async function measure(f: () => void, reps: number): Promise<{ seconds: number; peakBytes: number }> {
  // The profiled run doubles as the warm-up.
  const { peakBytes } = await tf.profile(() => f());
  const times: number[] = [];
  for (let i = 0; i < reps; i++) times.push(seconds(f)[1]);
  times.sort((a, b) => a - b);
  return { seconds: times[Math.floor(times.length / 2)], peakBytes };
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const fixture = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');
  const stories = await loadModelFolder(fixture);
  const smolConfig = llamaConfig({ ...SMOLLM_135M_SHAPE, layers: quick ? 2 : SMOLLM_135M_SHAPE.layers });
  const cases: Case[] = [
    { name: 'stories260K', config: stories.config, weights: stories.weights, batch: 4, seq: 256 },
    { name: quick ? 'smollm-135m-shape (2 layers, --quick)' : 'smollm-135m-shape', config: smolConfig, weights: randomWeights(smolConfig, 1), batch: 1, seq: 256 },
  ];
  const rows: Record<string, unknown>[] = [];
  for (const backend of BACKENDS) {
    try {
      await useBackend(backend);
    } catch {
      process.stdout.write(`${backend}: not available here, skipped\n`);
      continue;
    }
    for (const c of cases) {
      const model = LlamaModel.fromArrays(c.config, c.weights);
      const vars = [...model.weights.values()];
      for (const v of vars) v.trainable = true;
      const ids = tf.randomUniform([c.batch, c.seq], 0, c.config.vocabSize, 'int32') as tf.Tensor2D;
      const tokens = c.batch * c.seq;
      const big = c.config.numHiddenLayers * c.config.hiddenSize > 10000;
      const reps = big ? 1 : 5;
      const fwd = await measure(() => tf.tidy(() => void model.forward(ids).dataSync()), reps);
      const train = await measure(() => {
        const { value, grads } = tf.variableGrads(() => {
          const out = causalLmLoss(model.forward(ids), ids);
          return out.loss;
        }, vars);
        value.dataSync();
        tf.dispose([value, ...Object.values(grads)]);
      }, reps);
      const row = {
        backend,
        model: c.name,
        parameters: vars.reduce((n, v) => n + v.size, 0),
        batch: c.batch,
        seq: c.seq,
        forwardTokensPerSecond: tokens / fwd.seconds,
        trainStepTokensPerSecond: tokens / train.seconds,
        forwardPeakTensorBytes: fwd.peakBytes,
        trainPeakTensorBytes: train.peakBytes,
        rssBytes: process.memoryUsage().rss,
      };
      rows.push(row);
      process.stdout.write(
        `${backend.padEnd(8)} ${c.name.padEnd(38)} fwd ${row.forwardTokensPerSecond.toFixed(0).padStart(8)} tok/s  train ${row.trainStepTokensPerSecond.toFixed(0).padStart(8)} tok/s  peak fwd ${(fwd.peakBytes / 2 ** 20).toFixed(0)} MiB train ${(train.peakBytes / 2 ** 20).toFixed(0)} MiB  rss ${(row.rssBytes / 2 ** 20).toFixed(0)} MiB\n`,
      );
      ids.dispose();
      model.dispose();
    }
  }
  if (!existsSync(fixture)) throw new Error(`missing ${fixture}`);
  return { rows };
}
