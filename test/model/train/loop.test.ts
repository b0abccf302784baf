import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { tf, useBackend } from '../../../model/backend.ts';
import type { Adapter } from '../../../model/peft/adapter.ts';
import type { LlamaModel } from '../../../model/llama/llama.ts';
import { Trainer } from '../../../model/train/loop.ts';
import type { Batch } from '../../../model/train/batch.ts';
import type { Cut } from '../../../model/train/loop.ts';
import { AdamW } from '../../../model/train/optimizer.ts';
import { createAdapter } from '../../../model/peft/index.ts';
import type { MethodSpec } from '../../../model/peft/index.ts';
import { maxAbsDiff, randomBatch, snapshot, tinyModel } from './helpers.ts';

/** LoRA on every layer with B started non-zero, so bottom, middle and top all train; dropout on. */
const lora = (m: LlamaModel): Adapter => createAdapter(m, [{ method: 'lora', r: 2, loraDropout: 0.1, initLoraWeights: false, targetModules: ['q_proj', 'v_proj', 'down_proj'] }], { seed: 5 });
const real = (specs: MethodSpec[]) => (m: LlamaModel): Adapter => createAdapter(m, specs, { seed: 5 });

const schedule = { kind: 'constant' as const, lr: 0.05, warmupSteps: 0, totalSteps: 10 };

async function train(makeAdapter: (m: LlamaModel) => Adapter, steps: Batch[][], cut?: Cut): Promise<{ losses: number[]; weights: Map<string, Float32Array> }> {
  const model = tinyModel();
  const adapter = makeAdapter(model);
  const trainer = new Trainer({ model, adapter, optimizer: new AdamW({ weightDecay: 0.01 }), schedule, cut, maxGradNorm: 1 });
  const losses: number[] = [];
  for (const mbs of steps) losses.push((await trainer.trainStep(mbs)).loss);
  const weights = snapshot(adapter);
  trainer.optimizer.dispose();
  trainer.dispose();
  adapter.dispose();
  model.dispose();
  return { losses, weights };
}

const STEPS: Batch[][] = [0, 1, 2].map((s) => [randomBatch(10 + s, 2, 6)]);

describe('training loop', () => {
  it('gives the same losses and adapter for the whole model and for the cut (1, 1) with a local middle', async () => {
    await useBackend('cpu');
    const methods = [lora, real([{ method: 'prompt_tuning', numVirtualTokens: 2 }]), real([{ method: 'block', layersToTransform: [0, 2] }]), real([{ method: 'ia3' }])];
    for (const make of methods) {
      const whole = await train(make, STEPS);
      const cut = await train(make, STEPS, { bottom: 1, top: 1 });
      whole.losses.forEach((l, i) => assert.ok(Math.abs(l - cut.losses[i]) < 1e-5, `step ${i}: ${l} vs ${cut.losses[i]}`));
      assert.ok(maxAbsDiff(whole.weights, cut.weights) < 1e-5, `adapter differs by ${maxAbsDiff(whole.weights, cut.weights)}`);
    }
  });

  it('accumulating micro-batches equals one full batch, weighting by label tokens', async () => {
    await useBackend('cpu');
    const a = randomBatch(20, 2, 6);
    const b = randomBatch(21, 2, 6);
    // Uneven token counts: most of b's labels are masked.
    b.labels = b.labels.map((row) => row.map((x, t) => (t < 4 ? -100 : x)));
    const full: Batch = { ids: [...a.ids, ...b.ids], labels: [...a.labels, ...b.labels] };
    // Without dropout: its masks depend on how rows are grouped.
    const noDropout = real([{ method: 'lora', r: 2, initLoraWeights: false }]);
    const one = await train(noDropout, [[full], [full]]);
    const acc = await train(noDropout, [[a, b], [a, b]]);
    one.losses.forEach((l, i) => assert.ok(Math.abs(l - acc.losses[i]) < 1e-5, `step ${i}: ${l} vs ${acc.losses[i]}`));
    assert.ok(maxAbsDiff(one.weights, acc.weights) < 1e-5);
  });

  it('is reproducible bit for bit with the same seed and backend', async () => {
    await useBackend('cpu');
    const x = await train(lora, STEPS, { bottom: 1, top: 1 });
    const y = await train(lora, STEPS, { bottom: 1, top: 1 });
    assert.deepEqual(x.losses, y.losses);
    assert.equal(maxAbsDiff(x.weights, y.weights), 0);
  });

  it('does not grow memory over steps', async () => {
    await useBackend('cpu');
    const model = tinyModel();
    const adapter = lora(model);
    const trainer = new Trainer({ model, adapter, optimizer: new AdamW(), schedule, cut: { bottom: 1, top: 1 }, maxGradNorm: 1 });
    const batch = [randomBatch(3, 2, 6), randomBatch(4, 2, 6)];
    await trainer.trainStep(batch);
    await trainer.score(batch[0]);
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      await trainer.trainStep(batch);
      await trainer.score(batch[0]);
    }
    assert.equal(tf.memory().numTensors, before);
    trainer.optimizer.dispose();
    trainer.dispose();
    adapter.dispose();
    model.dispose();
  });
});
