// Held middle adapters on ONNX Runtime (`--engine ort-cpu`): the ORT executor gives each session
// what the tfjs executor gives it (h_M, g_B and the gradients of its LoRA factors or (IA)^3
// scales, within 1e-4 relative), sessions of one layout and shape run as one stacked graph (the
// base matmuls once, each adapter a batched matmul over the segments) equal to their runs alone.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { HeldAdapter } from '../../cloud-node/held-adapters.ts';
import { MiddleExecutor } from '../../cloud-node/middle-executor.ts';
import type { BatchInfo } from '../../cloud-node/middle-executor.ts';
import { LlamaModel, Rng, initBackend, loadModelFolder } from '../../model/index.ts';
import { STORIES_DIR } from './helpers.ts';
import { random, trainedHeld } from './held-helpers.ts';

const RANGE = { start: 1, end: 4 };
type Shape = [number, number, number];
let model: LlamaModel;
let hidden: number;
const executors: MiddleExecutor[] = [];
before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  hidden = loaded.config.hiddenSize;
});
after(async () => {
  for (const e of executors) await e.close();
  model.dispose();
});

/** max |a − b| over max |b|. */
function relDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let worst = 0;
  let scale = 0;
  for (let i = 0; i < a.length; i++) {
    worst = Math.max(worst, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return worst / Math.max(scale, 1e-12);
}

describe('held middle adapters on the ONNX Runtime middle', () => {
  it('stacked sessions (two of one LoRA layout, one of another, two (IA)^3s, another length) equal the tfjs executor and their runs alone', async () => {
    const batches: BatchInfo[] = [];
    const ort = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', engine: 'ort-cpu', batchWindowMs: 200, onBatch: (b) => batches.push(b) });
    const ortAlone = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', engine: 'ort-cpu', batchWindowMs: 0, maxBatchTokens: 1 });
    const tfjs = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 0, maxBatchTokens: 1 });
    executors.push(ort, ortAlone, tfjs);
    assert.equal(ort.holdsAdapters, true);
    const sessions: { held: HeldAdapter; shape: Shape }[] = [
      { held: trainedHeld(model, 1, ['q_proj', 'v_proj'], 'lora', 9), shape: [2, 6, hidden] },
      { held: trainedHeld(model, 2, ['q_proj', 'v_proj'], 'lora', 10), shape: [2, 6, hidden] },
      { held: trainedHeld(model, 3, ['q_proj', 'down_proj'], 'lora', 11), shape: [2, 6, hidden] },
      { held: trainedHeld(model, 4, ['k_proj', 'v_proj', 'down_proj'], 'ia3', 12), shape: [1, 6, hidden] },
      { held: trainedHeld(model, 5, ['q_proj', 'v_proj'], 'lora', 13), shape: [1, 9, hidden] },
      { held: trainedHeld(model, 6, ['k_proj', 'v_proj', 'down_proj'], 'ia3'), shape: [1, 6, hidden] },
    ];
    const rng = new Rng(9);
    const inputs = sessions.map((s) => ({ ...s, h: random(s.shape[0] * s.shape[1] * hidden, rng), g: random(s.shape[0] * s.shape[1] * hidden, rng, 0.1) }));
    const together = await Promise.all(inputs.map((x, i) => ort.forwardHeld(RANGE, x.h, x.shape, `tenant${i}`, x.held.lora())));
    assert.ok(batches.some((b) => b.kind === 'forward' && b.requests === 6), 'the six forwards ran as one batch');
    const backTogether = await Promise.all(inputs.map((x, i) => ort.backwardHeld(RANGE, x.h, x.g, x.shape, `tenant${i}`, x.held.lora())));
    for (const [i, x] of inputs.entries()) {
      const lora = x.held.lora();
      const one = await ortAlone.forwardHeld(RANGE, x.h, x.shape, 'solo', lora);
      const reference = await tfjs.forwardHeld(RANGE, x.h, x.shape, 'solo', lora);
      assert.ok(relDiff(together[i], one) <= 1e-5, `session ${i} h_M: stacked vs alone`);
      assert.ok(relDiff(one, reference) <= 1e-4, `session ${i} h_M: ORT vs tfjs ${relDiff(one, reference)}`);
      assert.ok(relDiff(one, await ortAlone.forward(RANGE, x.h, x.shape, 'solo')) > 1e-4, `session ${i}'s adapter changes its h_M`);
      const back = await ortAlone.backwardHeld(RANGE, x.h, x.g, x.shape, 'solo', lora);
      const backReference = await tfjs.backwardHeld(RANGE, x.h, x.g, x.shape, 'solo', lora);
      assert.ok(relDiff(backTogether[i].output, back.output) <= 1e-5, `session ${i} g_B: stacked vs alone`);
      assert.ok(relDiff(back.output, backReference.output) <= 1e-4, `session ${i} g_B: ORT vs tfjs ${relDiff(back.output, backReference.output)}`);
      assert.equal(back.loraGrads.length, backReference.loraGrads.length);
      assert.equal(back.loraGrads.length, x.held.spec.method === 'ia3' ? 9 : 12);
      back.loraGrads.forEach((gr, k) => {
        assert.ok(relDiff(backTogether[i].loraGrads[k], gr) <= 1e-5, `session ${i} gradient ${k}: stacked vs alone`);
        assert.ok(relDiff(gr, backReference.loraGrads[k]) <= 1e-4, `session ${i} gradient ${k}: ORT vs tfjs ${relDiff(gr, backReference.loraGrads[k])}`);
      });
    }
  });
});
