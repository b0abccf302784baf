import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { OrtMiddle, OrtMiddleExecutor } from '../../../model/engine/index.ts';
import type { OrtLlama } from '../../../model/engine/index.ts';
import { AdamW, LlamaModel, Rng, Trainer, createAdapter, tf } from '../../../model/index.ts';
import type { Batch, LoadedModel, Middle } from '../../../model/index.ts';
import { storiesOnOrt } from './stories-on-ort.ts';

function batch(seed: number, rows: number, seq: number): Batch {
  const rng = new Rng(seed);
  const ids = Array.from({ length: rows }, () => Array.from({ length: seq }, () => 3 + rng.int(509)));
  return { ids, labels: ids.map((r) => [...r]) };
}

describe('the middle on ONNX Runtime', () => {
  let loaded: LoadedModel;
  let engine: OrtLlama;

  before(async () => {
    ({ loaded, engine } = await storiesOnOrt());
  });

  it('trains the edge parts of the cut (1, 1) to the same losses and adapter as the tfjs middle', async () => {
    const run = async (middleOf?: () => Middle): Promise<{ losses: number[]; weights: Map<string, Float32Array> }> => {
      const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
      // LoRA on the bottom and top blocks only: the middle is frozen, and backward crosses it.
      const adapter = createAdapter(model, [{ method: 'lora', r: 2, initLoraWeights: false, targetModules: ['q_proj', 'v_proj'], layersToTransform: [0, 4] }], { seed: 5 });
      const middle = middleOf?.();
      const trainer = new Trainer({
        model,
        adapter,
        optimizer: new AdamW({ weightDecay: 0 }),
        schedule: { kind: 'constant', lr: 0.01, warmupSteps: 0, totalSteps: 10 },
        cut: { bottom: 1, top: 1 },
        middle,
      });
      const losses: number[] = [];
      for (let s = 0; s < 3; s++) losses.push((await trainer.trainStep([batch(10 + s, 2, 12)])).loss);
      const weights = new Map([...adapter.trainableVariables()].map(([n, v]) => [n, Float32Array.from(v.dataSync() as Float32Array)]));
      trainer.optimizer.dispose();
      trainer.dispose();
      middle?.dispose?.();
      adapter.dispose();
      model.dispose();
      return { losses, weights };
    };
    const local = await run();
    const ort = await run(() => new OrtMiddle(engine, 1, 4));
    local.losses.forEach((l, i) => assert.ok(Math.abs(l - ort.losses[i]) < 1e-5, `step ${i}: ${l} vs ${ort.losses[i]}`));
    let worst = 0;
    for (const [n, w] of local.weights) {
      const o = ort.weights.get(n) as Float32Array;
      for (let i = 0; i < w.length; i++) worst = Math.max(worst, Math.abs(w[i] - o[i]));
    }
    assert.ok(worst < 1e-4, `adapter differs by ${worst}`);
  });

  it('refuses a backward with no kept forward, and forgets a released one', async () => {
    const middle = new OrtMiddle(engine, 1, 4);
    const h = tf.randomNormal([1, 3, 64]) as tf.Tensor3D;
    await assert.rejects(middle.backward(h, { step: 1, microbatch: 0 }), /TANDEM_INPUT_INVALID/);
    (await middle.forward(h, { step: 1, microbatch: 0 })).dispose();
    middle.release({ step: 1, microbatch: 0 });
    await assert.rejects(middle.backward(h, { step: 1, microbatch: 0 }), /no forward was kept/);
    h.dispose();
  });

  it("serves cloud-node's executor calls: the VJP from what was kept equals the one recomputed from h_B", async () => {
    const exec = new OrtMiddleExecutor(engine);
    const shape: [number, number, number] = [2, 6, 64];
    const rng = new Rng(4);
    const h = Float32Array.from({ length: 2 * 6 * 64 }, () => rng.normal());
    const g = Float32Array.from({ length: 2 * 6 * 64 }, () => rng.normal());
    const range = { start: 1, end: 4 };
    const plain = await exec.forward(range, h, shape);
    const { output, kept } = await exec.forwardKeeping(range, h, shape);
    assert.deepEqual(output, plain);
    const fromKept = await exec.backwardFromKept(kept, g);
    // The recompute is one graph of its own (forward and VJP together): equal up to float32 rounding.
    const recomputed = await exec.backward(range, h, g, shape);
    let worst = 0;
    let scale = 0;
    fromKept.forEach((x, i) => {
      worst = Math.max(worst, Math.abs(x - recomputed[i]));
      scale = Math.max(scale, Math.abs(x));
    });
    assert.ok(worst <= 1e-5 * scale, `recomputed differs by ${worst} (scale ${scale})`);
    assert.ok(scale > 0);
  });
});
