// Per PEFT method: trainable parameters, training-step time and peak memory, on the shipped
// stories260K and on a random model of SmolLM-135M's shape (issue #2's shapes).
//
//   npm run bench -- peft [--quick] [--seq N]
//
// A step is forward, loss and the gradients of the method's trainable variables (the
// optimizer update is the same elementwise work for every method and is left out). --quick
// uses SmolLM's shape with 2 layers. On wasm a failed allocation aborts the backend's module,
// so the rest of that model's rows are then skipped and say so.
import { join } from 'node:path';
import { causalLmLoss, createAdapter, gradients, initBackend, LlamaModel, loadModelFolder, tf } from '../model/index.ts';
import { llamaConfig, randomWeights, SMOLLM_135M_SHAPE } from '../model/testing.ts';
import type { MethodSpec, ModelConfig } from '../model/index.ts';

/** One spec per method, at the sizes the PEFT literature uses for models of this scale. */
function methods(layers: number): { name: string; specs: MethodSpec[] }[] {
  const qv = ['q_proj', 'v_proj'];
  return [
    { name: 'lora r8 q,v', specs: [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: qv }] },
    { name: 'lora r8 all-linear', specs: [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: 'all-linear' }] },
    { name: 'lora_fa r8 q,v', specs: [{ method: 'lora_fa', r: 8, loraAlpha: 16, targetModules: qv }] },
    { name: 'dora r8 q,v', specs: [{ method: 'dora', r: 8, loraAlpha: 16, targetModules: qv }] },
    { name: 'vera r64 q,v', specs: [{ method: 'vera', r: 64, targetModules: qv }] },
    { name: 'ia3 k,v,down', specs: [{ method: 'ia3' }] },
    { name: 'prompt_tuning 16 tokens', specs: [{ method: 'prompt_tuning', numVirtualTokens: 16 }] },
    { name: 'bottleneck 16 attn+mlp', specs: [{ method: 'bottleneck', bottleneckSize: 16 }] },
    { name: 'bitfit', specs: [{ method: 'bitfit' }] },
    { name: 'block (last block)', specs: [{ method: 'block', layersToTransform: [layers - 1] }] },
  ];
}

interface Case {
  name: string;
  config: ModelConfig;
  weights: Map<string, { shape: number[]; data: Float32Array }>;
  batch: number;
  seq: number;
  reps: number;
}

function heapBytes(): number | undefined {
  return (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm?.HEAPU8?.buffer.byteLength;
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const seqAt = args.indexOf('--seq');
  const smolSeq = seqAt >= 0 ? Number(args[seqAt + 1]) : 128;
  const backend = await initBackend({ log: (l) => process.stdout.write(`${l}\n`) });
  const stories = await loadModelFolder(join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K'));
  const smol = llamaConfig({ ...SMOLLM_135M_SHAPE, layers: quick ? 2 : SMOLLM_135M_SHAPE.layers });
  const cases: Case[] = [
    { name: 'stories260K', config: stories.config, weights: stories.weights, batch: 4, seq: 128, reps: 5 },
    { name: quick ? 'smollm-135m-shape-2-layers' : 'smollm-135m-shape', config: smol, weights: randomWeights(smol, 1), batch: 1, seq: smolSeq, reps: 1 },
  ];
  const rows: Record<string, unknown>[] = [];
  const mib = (b: number | undefined): string => (b === undefined ? '-' : `${(b / 2 ** 20).toFixed(0)} MiB`);
  for (const c of cases) {
    const model = LlamaModel.fromArrays(c.config, c.weights);
    const ids = tf.randomUniform([c.batch, c.seq], 0, c.config.vocabSize, 'int32', 5) as tf.Tensor2D;
    const tokens = c.batch * c.seq;
    process.stdout.write(`\n${c.name} (${backend.name}), batch ${c.batch} x seq ${c.seq}\n${'method'.padEnd(26)} ${'trainable'.padStart(10)} ${'step s'.padStart(8)} ${'tok/s'.padStart(8)}  peak tensors  heap\n`);
    let aborted: string | undefined;
    for (const m of methods(c.config.numHiddenLayers)) {
      const row: Record<string, unknown> = { backend: backend.name, model: c.name, method: m.name, specs: m.specs, batch: c.batch, seq: c.seq };
      rows.push(row);
      if (aborted) {
        row.skipped = aborted;
        process.stdout.write(`${m.name.padEnd(26)} skipped: ${aborted}\n`);
        continue;
      }
      let adapter;
      try {
        adapter = createAdapter(model, m.specs, { seed: 0 });
      } catch (err) {
        row.notApplicable = (err as Error).message.split('\n')[0];
        process.stdout.write(`${m.name.padEnd(26)} n/a: ${row.notApplicable as string}\n`);
        continue;
      }
      const vars = [...adapter.trainableVariables().values()];
      const hooks = adapter.hooks;
      const step = (): void => {
        const { value, grads } = gradients(() => causalLmLoss(model.forward(ids, { hooks, training: true }), ids).loss, vars);
        value.dataSync();
        tf.dispose([value, ...grads.filter((g): g is tf.Tensor => g !== undefined)]);
      };
      try {
        const { peakBytes } = await tf.profile(step);
        const times: number[] = [];
        for (let i = 0; i < c.reps; i++) {
          const t0 = performance.now();
          step();
          times.push((performance.now() - t0) / 1000);
        }
        times.sort((a, b) => a - b);
        const seconds = times[Math.floor(times.length / 2)];
        Object.assign(row, { trainableParameters: vars.reduce((n, v) => n + v.size, 0), stepSeconds: seconds, tokensPerSecond: tokens / seconds, peakTensorBytes: peakBytes, heapBytes: heapBytes() });
        process.stdout.write(`${m.name.padEnd(26)} ${String(row.trainableParameters).padStart(10)} ${seconds.toFixed(3).padStart(8)} ${(tokens / seconds).toFixed(0).padStart(8)}  ${mib(peakBytes).padStart(12)}  ${mib(heapBytes())}\n`);
      } catch (err) {
        aborted = `${backend.name} failed on ${m.name}: ${(err as Error).message.split('\n')[0].slice(0, 120)}`;
        row.error = aborted;
        process.stdout.write(`${m.name.padEnd(26)} failed: ${aborted}\n`);
      } finally {
        if (!aborted) adapter.dispose();
      }
    }
    if (!aborted) {
      ids.dispose();
      model.dispose();
    }
  }
  process.stdout.write('\npeak tensors: the largest sum of live tensor sizes tfjs counted during one step (tensors sharing data count each time); heap: the wasm heap so far (it only grows)\n');
  return { rows };
}
