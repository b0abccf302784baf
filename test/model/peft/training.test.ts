// Every PEFT method, trained by the real loop (trainLocal) for a few steps on a small dataset,
// lowers the validation loss. BitFit needs biases: it runs on stories260K converted to Qwen2's
// architecture (q/k/v biases, zero-initialised, so the model computes the same function).
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { expectedTensorShapes, loadModelFolder, parseModelConfig, saveModelFolder } from '../../../model/index.ts';
import type { MethodSpec } from '../../../model/index.ts';
import { DEFAULT_RECIPE } from '../../../model/train/recipe.ts';
import { trainLocal } from '../../../model/train/run.ts';
import type { TrainEvent } from '../../../model/train/training-run.ts';
import { STORIES_DIR, tempDir } from '../helpers.ts';

const SENTENCES = ['Tom has a red ball.', 'The cat sat on the mat.', 'Lily likes to play in the park.', 'The sun is big and warm.', 'Ben has a little dog.'];

const METHODS: [string, MethodSpec[], number][] = [
  ['lora', [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'o_proj'] }], 3e-2],
  ['lora_fa', [{ method: 'lora_fa', r: 4, loraAlpha: 8, targetModules: 'all-linear' }], 3e-2],
  ['dora', [{ method: 'dora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'o_proj'] }], 3e-2],
  ['vera', [{ method: 'vera', r: 16, targetModules: 'all-linear' }], 5e-2],
  ['ia3', [{ method: 'ia3' }], 5e-2],
  ['prompt_tuning', [{ method: 'prompt_tuning', numVirtualTokens: 4 }], 5e-2],
  ['bottleneck', [{ method: 'bottleneck', bottleneckSize: 8 }], 3e-2],
  ['block', [{ method: 'block', layersToTransform: [4] }], 1e-2],
  ['lora on the top blocks + a soft prompt', [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'], layersToTransform: [3, 4] }, { method: 'prompt_tuning', numVirtualTokens: 4 }], 3e-2],
];

let data: string;
let qwen2Dir: string;

before(async () => {
  const dir = await tempDir();
  data = join(dir, 'train.jsonl');
  await writeFile(data, `${Array.from({ length: 30 }, (_, i) => JSON.stringify({ text: SENTENCES[i % SENTENCES.length] })).join('\n')}\n`);
  // stories260K as Qwen2: the same weights plus zero q/k/v biases.
  const loaded = await loadModelFolder(STORIES_DIR);
  const raw = { ...loaded.config.raw, model_type: 'qwen2', architectures: ['Qwen2ForCausalLM'] };
  const weights = new Map(loaded.weights);
  for (const [name, shape] of expectedTensorShapes(parseModelConfig(raw))) if (!weights.has(name)) weights.set(name, { shape, data: new Float32Array(shape[0]) });
  qwen2Dir = join(dir, 'stories260K-qwen2');
  await saveModelFolder(qwen2Dir, raw, weights, { copyFiles: ['tokenizer.json', 'tokenizer_config.json'].map((f) => join(STORIES_DIR, f)) });
});

async function validationLosses(modelDir: string, methods: MethodSpec[], lr: number): Promise<[number, number]> {
  const events: TrainEvent[] = [];
  await trainLocal(
    { ...DEFAULT_RECIPE, modelDir, dataFile: data, outDir: await tempDir(), methods, steps: 8, batchSize: 4, seqLen: 16, lr, warmupSteps: 1, schedule: 'linear', valFraction: 0.2, evalEvery: 8, saveEvery: 0, backend: 'wasm' },
    (e) => events.push(e),
  );
  const evals = events.filter((e): e is Extract<TrainEvent, { type: 'eval' }> => e.type === 'eval');
  return [evals[0].loss, evals.at(-1)?.loss ?? Infinity];
}

describe('every PEFT method lowers the validation loss in a short run', () => {
  for (const [name, methods, lr] of METHODS) {
    it(name, async () => {
      const [start, end] = await validationLosses(STORIES_DIR, methods, lr);
      assert.ok(end < start - 0.05, `validation loss ${start} → ${end}`);
    });
  }

  it('bitfit (stories260K as Qwen2, q/k/v biases)', async () => {
    const [start, end] = await validationLosses(qwen2Dir, [{ method: 'bitfit' }], 5e-2);
    assert.ok(end < start - 0.05, `validation loss ${start} → ${end}`);
  });
});
