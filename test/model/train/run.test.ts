import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ModelError } from '../../../model/errors.ts';
import { DEFAULT_RECIPE } from '../../../model/train/recipe.ts';
import { trainLocal } from '../../../model/train/run.ts';
import type { TrainLocalOptions } from '../../../model/train/run.ts';
import { openRun, runSteps, runTraining } from '../../../model/train/training-run.ts';
import type { TrainEvent, TrainingSpec } from '../../../model/train/training-run.ts';
import { initBackend } from '../../../model/backend.ts';
import { loadModelFolder } from '../../../model/checkpoint.ts';
import { LlamaModel } from '../../../model/llama/llama.ts';
import { loadTokenizer } from '../../../model/tokenizer.ts';
import { STORIES_DIR, tempDir } from '../helpers.ts';

const SENTENCES = ['Tom has a red ball.', 'The cat sat on the mat.', 'Lily likes to play in the park.', 'The sun is big and warm.', 'Ben has a little dog.'];

async function dataset(): Promise<string> {
  const dir = await tempDir();
  const file = join(dir, 'train.jsonl');
  const lines = Array.from({ length: 30 }, (_, i) => JSON.stringify({ text: SENTENCES[i % SENTENCES.length] }));
  await writeFile(file, `${lines.join('\n')}\n`);
  return file;
}

function options(dataFile: string, outDir: string, over: Partial<TrainLocalOptions> = {}): TrainLocalOptions {
  return {
    ...DEFAULT_RECIPE,
    modelDir: STORIES_DIR,
    dataFile,
    outDir,
    methods: [{ method: 'lora', r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: ['q_proj', 'v_proj', 'o_proj'] }],
    steps: 4,
    batchSize: 2,
    seqLen: 16,
    lr: 5e-3,
    warmupSteps: 1,
    valFraction: 0.2,
    evalEvery: 0,
    saveEvery: 0,
    backend: 'wasm',
    ...over,
  };
}

describe('local training', () => {
  it('lowers the validation loss on a small dataset (stories260K, LoRA)', async () => {
    const data = await dataset();
    const events: TrainEvent[] = [];
    const summary = await trainLocal(options(data, await tempDir(), { steps: 8, evalEvery: 8, lr: 3e-2, schedule: 'linear', warmupSteps: 1, batchSize: 4, seqLen: 16 }), (e) => events.push(e));
    const evals = events.filter((e): e is Extract<TrainEvent, { type: 'eval' }> => e.type === 'eval');
    assert.equal(evals[0].step, 0);
    assert.equal(evals.at(-1)?.step, 8);
    assert.ok((evals.at(-1)?.loss ?? Infinity) < evals[0].loss - 0.1, `validation loss ${evals[0].loss} → ${evals.at(-1)?.loss}`);
    assert.ok(summary.finished && summary.adapterDir);
    assert.ok(events.some((e) => e.type === 'step' && e.tokensPerSecond > 0 && e.etaSeconds >= 0));
  });

  it('resumes exactly: 2 + 2 steps with a restart equal 4 straight, bit for bit', async () => {
    const data = await dataset();
    const straight = await tempDir();
    await trainLocal(options(data, straight, { gradientAccumulationSteps: 2 }));
    const parts = await tempDir();
    const first = await trainLocal(options(data, parts, { gradientAccumulationSteps: 2, stopAfter: 2 }));
    assert.equal(first.finished, false);
    assert.equal(first.step, 2);
    // A second start without --resume must not overwrite the checkpoint.
    await assert.rejects(trainLocal(options(data, parts, { gradientAccumulationSteps: 2 })), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_TRAIN_OPTION_INVALID');
    // A different recipe cannot resume this checkpoint.
    await assert.rejects(trainLocal(options(data, parts, { gradientAccumulationSteps: 2, lr: 1e-3, resume: true })), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_CHECKPOINT_INVALID' && e.message.includes('recipe'));
    const second = await trainLocal(options(data, parts, { gradientAccumulationSteps: 2, resume: true }));
    assert.equal(second.step, 4);
    const a = await readFile(join(straight, 'adapter', 'adapter_model.safetensors'));
    const b = await readFile(join(parts, 'adapter', 'adapter_model.safetensors'));
    assert.ok(a.equals(b), 'adapters differ');
    const c = await readFile(join(straight, 'checkpoint', 'optimizer.safetensors'));
    const d = await readFile(join(parts, 'checkpoint', 'optimizer.safetensors'));
    assert.ok(c.equals(d), 'optimizer states differ');
  });

  it('continues N steps from a run state: 2 steps, then 2 more on the same state, equal 4 in one run', async () => {
    await initBackend({ backend: 'wasm' });
    const loaded = await loadModelFolder(STORIES_DIR);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    try {
      const spec: TrainingSpec = {
        model, tokenizer: await loadTokenizer(STORIES_DIR), modelHash: loaded.contentHash, dataFile: await dataset(), baseModel: STORIES_DIR, evaluate: false,
        recipe: { ...DEFAULT_RECIPE, steps: 4, batchSize: 2, seqLen: 16, lr: 5e-3, warmupSteps: 1, valFraction: 0.2 },
        methods: [{ method: 'lora', r: 4, loraDropout: 0.1, targetModules: ['q_proj', 'v_proj'] }],
      };
      const adapterOut = await tempDir();
      const straight = await runTraining({ ...spec, adapterOut });
      // A run may also start from an adapter folder (as a federated round starts from the global adapter).
      const from = await openRun({ ...spec, adapterDir: adapterOut });
      try {
        for (const [name, v] of from.adapter.trainableVariables()) assert.deepEqual(Float32Array.from(v.dataSync() as Float32Array), straight.adapter.get(name)?.data, name);
      } finally {
        from.optimizer.dispose();
        from.adapter.dispose();
      }
      const state = await openRun(spec);
      try {
        const first = await runSteps(state, { ...spec, stopAfter: 2 });
        const rest = await runSteps(state, spec);
        assert.equal(first.finished, false);
        assert.equal(rest.startStep, 2);
        assert.ok(rest.finished);
        assert.deepEqual([...first.losses, ...rest.losses], straight.losses);
        for (const [name, t] of straight.adapter) assert.deepEqual(rest.adapter.get(name)?.data, t.data, name);
      } finally {
        state.optimizer.dispose();
        state.adapter.dispose();
      }
    } finally {
      model.dispose();
    }
  });
});
