// Sessions with their own held middle LoRAs or (IA)^3s through the executor (protocol 1.3): their forwards
// arriving together run as one packed backbone call (the base matmuls once, each LoRA on its own
// rows), and each session gets back what it gets alone: h_M, and from the backward g_B and its
// factors' gradients, within 1e-5.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { MiddleExecutor } from '../../cloud-node/middle-executor.ts';
import type { BatchInfo } from '../../cloud-node/middle-executor.ts';
import { LlamaModel, Rng, initBackend, loadModelFolder } from '../../model/index.ts';
import { STORIES_DIR } from './helpers.ts';
import { random, trainedHeld } from './held-helpers.ts';

const RANGE = { start: 1, end: 4 };
let model: LlamaModel;
const executors: MiddleExecutor[] = [];
before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
});
after(async () => {
  for (const e of executors) await e.close();
  model.dispose();
});

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

describe('held middle LoRAs batched across sessions in the executor', () => {
  it('three sessions (two LoRAs, one (IA)^3) of different sequence lengths: one packed forward, each result equal to its run alone', async () => {
    const hidden = model.config.hiddenSize;
    const batches: BatchInfo[] = [];
    const batched = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 200, onBatch: (b) => batches.push(b) });
    const alone = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 0, maxBatchTokens: 1 });
    executors.push(batched, alone);
    const sessions = [
      { held: trainedHeld(model, 1, ['q_proj', 'v_proj']), shape: [2, 5, hidden] as [number, number, number] },
      { held: trainedHeld(model, 2, ['q_proj', 'down_proj']), shape: [1, 7, hidden] as [number, number, number] },
      { held: trainedHeld(model, 3, ['k_proj', 'v_proj', 'down_proj'], 'ia3'), shape: [1, 6, hidden] as [number, number, number] },
    ];
    const rng = new Rng(9);
    const inputs = sessions.map((s) => ({ ...s, h: random(s.shape[0] * s.shape[1] * hidden, rng), g: random(s.shape[0] * s.shape[1] * hidden, rng, 0.1) }));
    const together = await Promise.all(inputs.map((x, i) => batched.forwardHeld(RANGE, x.h, x.shape, `tenant${i}`, x.held.lora())));
    assert.ok(batches.some((b) => b.kind === 'forward' && b.requests === 3), 'the three forwards ran as one batch');
    const backTogether = await Promise.all(inputs.map((x, i) => batched.backwardHeld(RANGE, x.h, x.g, x.shape, `tenant${i}`, x.held.lora())));
    for (const [i, x] of inputs.entries()) {
      const one = await alone.forwardHeld(RANGE, x.h, x.shape, 'solo', x.held.lora());
      assert.ok(maxDiff(together[i], one) <= 1e-5, `session ${i} h_M`);
      const plain = await alone.forward(RANGE, x.h, x.shape, 'solo');
      assert.ok(maxDiff(one, plain) > 1e-4, `session ${i}'s LoRA changes its h_M`);
      const back = await alone.backwardHeld(RANGE, x.h, x.g, x.shape, 'solo', x.held.lora());
      assert.ok(maxDiff(backTogether[i].output, back.output) <= 1e-5, `session ${i} g_B`);
      assert.equal(back.loraGrads.length, x.held.spec.method === 'ia3' ? 9 : 12);
      back.loraGrads.forEach((gr, k) => assert.ok(maxDiff(backTogether[i].loraGrads[k], gr) <= 1e-5, `session ${i} factor ${k}`));
    }
  });
});
