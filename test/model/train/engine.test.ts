import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import type { OrtLlama } from '../../../model/engine/index.ts';
import { AdamW, LlamaModel, Rng, Trainer, createAdapter, evaluateRows } from '../../../model/index.ts';
import type { Batch, Cut, LoadedModel, MethodSpec } from '../../../model/index.ts';
import { storiesOnOrt } from '../engine/stories-on-ort.ts';

function batch(seed: number, rows: number, seq: number): Batch {
  const rng = new Rng(seed);
  const ids = Array.from({ length: rows }, () => Array.from({ length: seq }, () => 3 + rng.int(509)));
  // Some labels masked, so the weighting by the step's label tokens is exercised.
  return { ids, labels: ids.map((r) => r.map((x, t) => (t === 3 ? -100 : x))) };
}

interface Run {
  losses: number[];
  scores: number[];
  weights: Map<string, Float32Array>;
  note: string | undefined;
}

describe('training on the ONNX Runtime engine', () => {
  let loaded: LoadedModel;
  let engine: OrtLlama;

  before(async () => {
    ({ loaded, engine } = await storiesOnOrt());
  });

  const run = async (methods: MethodSpec[], cut: Cut | undefined, onEngine: boolean): Promise<Run> => {
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const adapter = createAdapter(model, methods, { seed: 5 });
    const trainer = new Trainer({
      model, adapter, optimizer: new AdamW({ weightDecay: 0.01 }), cut, maxGradNorm: 1,
      schedule: { kind: 'constant', lr: 0.01, warmupSteps: 0, totalSteps: 10 },
      ...(onEngine ? { engine } : {}),
    });
    const losses: number[] = [];
    // Two micro-batches per step: accumulation and (for a remote-like middle) the pipeline.
    for (let s = 0; s < 3; s++) losses.push((await trainer.trainStep([batch(10 + s, 2, 12), batch(20 + s, 1, 12)])).loss);
    const scored = await evaluateRows(trainer, [batch(40, 1, 9), batch(41, 1, 9)].map((b) => ({ ids: b.ids[0], labels: b.labels[0] })), 2);
    const weights = new Map([...adapter.trainableVariables()].map(([n, v]) => [n, Float32Array.from(v.dataSync() as Float32Array)]));
    const note = trainer.engineNote;
    trainer.optimizer.dispose();
    trainer.dispose();
    adapter.dispose();
    model.dispose();
    return { losses, scores: [scored.loss], weights, note };
  };

  const compare = (a: Run, b: Run, tol: number): void => {
    a.losses.forEach((l, i) => assert.ok(Math.abs(l - b.losses[i]) < tol, `step ${i}: ${l} vs ${b.losses[i]}`));
    assert.ok(Math.abs(a.scores[0] - b.scores[0]) < tol, `eval loss ${a.scores[0]} vs ${b.scores[0]}`);
    let worst = 0;
    let size = 0;
    for (const [n, w] of a.weights) {
      const o = b.weights.get(n) as Float32Array;
      for (let i = 0; i < w.length; i++) {
        worst = Math.max(worst, Math.abs(w[i] - o[i]));
        size = Math.max(size, Math.abs(w[i]));
      }
    }
    assert.ok(worst <= 1e-4 * Math.max(size, 1), `adapter differs by ${worst} (largest value ${size})`);
  };

  const LORA: MethodSpec[] = [{ method: 'lora', r: 2, initLoraWeights: false, targetModules: ['q_proj', 'v_proj', 'down_proj'] }];

  it('trains plain LoRA on the whole model to the losses, validation loss and adapter of tfjs', async () => {
    const tfjs = await run(LORA, undefined, false);
    const ort = await run(LORA, undefined, true);
    assert.match(ort.note ?? '', /^ort-cpu: LoRA r2 on q_proj,v_proj,down_proj/);
    compare(tfjs, ort, 1e-4);
  });

  it('trains the cut (1, 1) with bottom, middle and top on the engine, and with LoRA in the middle kept on tfjs', async () => {
    const edgeOnly: MethodSpec[] = [{ ...LORA[0], layersToTransform: [0, 4] }];
    compare(await run(edgeOnly, { bottom: 1, top: 1 }, false), await run(edgeOnly, { bottom: 1, top: 1 }, true), 1e-4);
    compare(await run(LORA, { bottom: 2, top: 1 }, false), await run(LORA, { bottom: 2, top: 1 }, true), 1e-4);
  });

  it('keeps the methods the graphs do not carry on tfjs, and says why', async () => {
    const cases: [MethodSpec[], RegExp][] = [
      [[{ method: 'ia3' }], /^tfjs: ia3 is not plain LoRA/],
      [[{ method: 'lora', loraDropout: 0.1 }], /^tfjs: lora_dropout 0.1/],
      [[{ method: 'dora' }], /^tfjs: dora is not plain LoRA/],
    ];
    for (const [methods, note] of cases) {
      const tfjs = await run(methods, undefined, false);
      const ort = await run(methods, undefined, true);
      assert.match(ort.note ?? '', note);
      assert.deepEqual(ort.losses, tfjs.losses);
    }
  });
});
