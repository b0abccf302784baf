// Sessions with different middle LoRAs in one packed batch (issue 13, Punica's grouping in
// model/engine's ops): the base matmul once for every token, each segment's low-rank part on
// its own rows. Each segment's output, and the gradients of its h_B and of its LoRA factors,
// equal those of LlamaModel.blocks run alone with that LoRA as a linear hook: within 1e-5 of
// the largest value (gradients reach ~40 here; the packed path sums in another order).
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { LlamaModel, PackedBlocks, Rng, gradients, initBackend, loadModelFolder, segmentLoraDelta, tf } from '../../model/index.ts';
import type { LoraFactors, PackedSegment, SegmentLora } from '../../model/index.ts';
import { STORIES_DIR } from './helpers.ts';

let model: LlamaModel;
before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
});

function normal(shape: [number, number], rng: Rng, scale: number): tf.Tensor2D {
  const data = new Float32Array(shape[0] * shape[1]);
  for (let i = 0; i < data.length; i++) data[i] = rng.normal() * scale;
  return tf.tensor2d(data, shape);
}

/** A LoRA of rank 4 on q_proj and down_proj of blocks 1..3 (large enough to change outputs). */
function lora(rng: Rng): SegmentLora {
  const { hiddenSize: d, numAttentionHeads: nH, headDim, intermediateSize } = model.config;
  const m = new Map<string, LoraFactors>();
  for (let layer = 1; layer < 4; layer++) {
    m.set(`model.layers.${layer}.self_attn.q_proj`, { a: normal([4, d], rng, 0.3), b: normal([nH * headDim, 4], rng, 0.3), scale: 2 });
    m.set(`model.layers.${layer}.mlp.down_proj`, { a: normal([4, intermediateSize], rng, 0.3), b: normal([d, 4], rng, 0.3), scale: 2 });
  }
  return m;
}

/** The largest difference, as a share of the largest value (or absolute below 1). */
function relDiff(got: Float32Array, want: Float32Array): number {
  let top = 1;
  for (const v of want) top = Math.max(top, Math.abs(v));
  return maxDiff(got, want) / top;
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

describe('different middle LoRAs in one packed batch', () => {
  it('each segment gets its own LoRA\'s output and gradients, a segment without one the base model\'s', async () => {
    const rng = new Rng(3);
    await check([
      { start: 1, end: 4, batch: 1, seq: 9 },
      { start: 1, end: 4, batch: 2, seq: 6 },
      { start: 2, end: 4, batch: 1, seq: 9 },
    ], [lora(rng), undefined, lora(rng)]);
  });

  it('segments of one shape, each with a LoRA, take the stacked path (two batched matmuls) with the same results', async () => {
    const rng = new Rng(4);
    await check([
      { start: 1, end: 4, batch: 1, seq: 7 },
      { start: 1, end: 4, batch: 1, seq: 7 },
      { start: 1, end: 4, batch: 1, seq: 7 },
    ], [lora(rng), lora(rng), lora(rng)]);
  });
});

/** Runs the segments packed with their LoRAs and compares each with the model alone. */
async function check(segments: PackedSegment[], loras: (SegmentLora | undefined)[]): Promise<void> {
  const rng = new Rng(5);
  const d = model.config.hiddenSize;
  const inputs = segments.map((s) => normal([s.batch * s.seq, d], rng, 1));
  const dys = segments.map((s) => normal([s.batch * s.seq, d], rng, 1));
  const factors = (l: SegmentLora | undefined): tf.Tensor[] => (l === undefined ? [] : [...l.values()].flatMap((f) => [f.a, f.b]));
  const packed = new PackedBlocks(model);
  const all = [...inputs, ...loras.flatMap(factors)];
  const together = gradients(() => tf.concat(packed.run(inputs, segments, segmentLoraDelta(loras)), 0), all, tf.concat(dys, 0));
  const gotOut = (await together.value.data()) as Float32Array;
  const gotGrads = await Promise.all(together.grads.map(async (g) => (g === undefined ? undefined : ((await g.data()) as Float32Array))));
  let row = 0;
  let factor = inputs.length;
  for (const [k, s] of segments.entries()) {
    const l = loras[k];
    // The reference: the model alone, the LoRA as a linear hook.
    const hooks = {
      linear: (module: { path: string }, x: tf.Tensor2D, base: (x: tf.Tensor2D) => tf.Tensor2D): tf.Tensor2D => {
        const f = l?.get(module.path);
        const y = base(x);
        return f === undefined ? y : (tf.add(y, tf.mul(tf.matMul(tf.matMul(x, f.a, false, true), f.b, false, true), f.scale)) as tf.Tensor2D);
      },
    };
    const x = inputs[k];
    const alone = gradients(
      () => tf.reshape(model.blocks(tf.reshape(x, [s.batch, s.seq, d]) as tf.Tensor3D, s.start, s.end, { hooks }), [s.batch * s.seq, d]),
      [x, ...factors(l)], dys[k],
    );
    const wantOut = (await alone.value.data()) as Float32Array;
    const n = s.batch * s.seq * d;
    const out = gotOut.slice(row, row + n);
    assert.ok(relDiff(out, wantOut) <= 1e-5, `segment ${k}'s output differs by ${relDiff(out, wantOut)}`);
    const gB = relDiff(gotGrads[k] as Float32Array, (await alone.grads[0]!.data()) as Float32Array);
    assert.ok(gB <= 1e-5, `segment ${k}'s g_B differs by ${gB}`);
    for (let j = 1; j < alone.grads.length; j++) {
      const wanted = alone.grads[j];
      const got = gotGrads[factor++];
      // A factor of a block outside the segment's range gets no gradient, alone or packed.
      if (wanted === undefined) {
        assert.ok(got === undefined || got.every((v) => v === 0), `segment ${k}'s LoRA factor ${j} has a gradient`);
        continue;
      }
      const want = (await wanted.data()) as Float32Array;
      assert.ok(got !== undefined && relDiff(got, want) <= 1e-5, `segment ${k}'s LoRA factor ${j} gradient differs`);
    }
    row += n;
  }
  // The LoRA changes the outputs: the comparisons above could fail.
  const base = (await tf.tidy(() => tf.concat(packed.run(inputs, segments), 0)).data()) as Float32Array;
  row = 0;
  for (const [k, s] of segments.entries()) {
    const n = s.batch * s.seq * d;
    const diff = maxDiff(base.slice(row, row + n), gotOut.slice(row, row + n));
    if (loras[k] === undefined) assert.ok(diff <= 1e-6, `segment ${k} without a LoRA gets the base model`);
    else assert.ok(diff > 1e-3, `segment ${k}'s LoRA changes its output`);
    row += n;
  }
  packed.dispose();
}
