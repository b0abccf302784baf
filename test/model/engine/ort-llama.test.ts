import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { OrtKvCache } from '../../../model/engine/index.ts';
import type { LoraParams, LoraSpec, OrtLlama } from '../../../model/engine/index.ts';
import { LlamaModel, Rng, causalLmLoss, createAdapter, gradients, tapedForward, tf } from '../../../model/index.ts';
import type { LoadedModel } from '../../../model/index.ts';
import { STORIES_DIR, rejectsModelError } from '../helpers.ts';
import { storiesOnOrt } from './stories-on-ort.ts';

/** max |a - b| / max |b|. */
function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  let m = 0;
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / m;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < b.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

const randomArray = (n: number, seed: number, scale = 1): Float32Array => {
  const rng = new Rng(seed);
  return Float32Array.from({ length: n }, () => rng.normal() * scale);
};

describe('the ONNX Runtime engine on stories260K', () => {
  let loaded: LoadedModel;
  let engine: OrtLlama;
  let model: LlamaModel;

  before(async () => {
    ({ loaded, engine } = await storiesOnOrt());
    model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  });

  it('gives the logits of the tfjs model within 1e-4, for any batch and sequence length from one session', async () => {
    for (const [b, s] of [
      [2, 7],
      [1, 20],
    ]) {
      const ids = Int32Array.from({ length: b * s }, (_, i) => (i * 131 + 7) % loaded.config.vocabSize);
      const mine = await engine.logits(ids, b, s);
      const ref = tf.tidy(() => model.forward(tf.tensor2d(ids, [b, s], 'int32')).dataSync());
      assert.equal(mine.length, b * s * loaded.config.vocabSize);
      assert.ok(maxAbsDiff(mine, ref) < 1e-4, `max |diff| ${maxAbsDiff(mine, ref)}`);
    }
    assert.deepEqual(engine.sessionKeys, ['logits']);
  });

  it('continues "Once upon a time" greedily exactly as the reference does', async () => {
    const reference = JSON.parse(await readFile(join(STORIES_DIR, 'reference-once-upon-a-time.json'), 'utf8')) as { input_ids: number[]; greedy_ids: number[] };
    const ids = [...reference.input_ids];
    const v = loaded.config.vocabSize;
    for (let step = 0; step < reference.greedy_ids.length; step++) {
      const logits = await engine.logits(Int32Array.from(ids), 1, ids.length);
      const last = logits.subarray((ids.length - 1) * v, ids.length * v);
      let best = 0;
      for (let j = 1; j < v; j++) if (last[j] > last[best]) best = j;
      ids.push(best);
    }
    assert.deepEqual(ids.slice(reference.input_ids.length), reference.greedy_ids);
    // The same continuation with the KV cache, one position per call after the prompt.
    assert.deepEqual(await engine.generateGreedy(reference.input_ids, reference.greedy_ids.length), reference.greedy_ids);
  });

  it('with a KV cache gives the last-position logits of the full forward, and refuses a different batch', async () => {
    const ids = Int32Array.from([1, 403, 407, 261, 378, 90, 12, 300]);
    const full = await engine.logits(ids, 2, 4);
    const cache = new OrtKvCache();
    const v = loaded.config.vocabSize;
    const first = await engine.logitsCached(Int32Array.from([1, 403, 378, 90]), 2, 2, cache);
    assert.ok(maxAbsDiff(first.subarray(0, v), full.subarray(v, 2 * v)) < 1e-4);
    assert.ok(maxAbsDiff(first.subarray(v), full.subarray(5 * v, 6 * v)) < 1e-4);
    const second = await engine.logitsCached(Int32Array.from([407, 12]), 2, 1, cache);
    assert.equal(cache.length, 3);
    assert.ok(maxAbsDiff(second.subarray(0, v), full.subarray(2 * v, 3 * v)) < 1e-4);
    assert.ok(maxAbsDiff(second.subarray(v), full.subarray(6 * v, 7 * v)) < 1e-4);
    await rejectsModelError(engine.logitsCached(Int32Array.from([5]), 1, 1, cache), 'TANDEM_INPUT_INVALID', 'batch');
  });

  it('runs a block range with a KV cache, a few positions at a time, as the whole range runs at once (split inference)', async () => {
    const d = loaded.config.hiddenSize;
    const h = randomArray(9 * d, 17);
    const whole = await engine.blocks(h, 1, 9, 1, 4);
    const cache = new OrtKvCache();
    let at = 0;
    for (const n of [4, 1, 3, 1]) {
      const part = await engine.blocksCached(h.subarray(at * d, (at + n) * d), 1, n, 1, 4, cache);
      assert.ok(maxAbsDiff(part, whole.subarray(at * d, (at + n) * d)) < 1e-4, `positions [${at}, ${at + n})`);
      at += n;
    }
    assert.equal(cache.length, 9);
    await rejectsModelError(engine.blocksCached(h.subarray(0, d), 1, 1, 0, 4, cache), 'TANDEM_INPUT_INVALID', 'other blocks');
  });

  it('runs a block range and its vector-Jacobian product within 1e-4 (relative) of tfjs', async () => {
    const [b, s, d] = [2, 9, loaded.config.hiddenSize];
    const h = randomArray(b * s * d, 1);
    const dy = randomArray(b * s * d, 2);
    const kept = await engine.blocksKeep(h, b, s, 1, 4);
    assert.ok(kept.savedBytes > 0);
    const plain = await engine.blocks(h, b, s, 1, 4);
    assert.deepEqual(plain, kept.output);
    const dx = await kept.vjp(dy);
    const ht = tf.tensor3d(h, [b, s, d]);
    const taped = tapedForward(() => model.blocks(ht, 1, 4), [ht]);
    const out = taped.output.dataSync();
    const [gRef] = taped.vjp(tf.tensor3d(dy, [b, s, d]));
    assert.ok(relativeError(kept.output, out) < 1e-4, `forward ${relativeError(kept.output, out)}`);
    assert.ok(relativeError(dx, gRef.dataSync()) < 1e-4, `vjp ${relativeError(dx, gRef.dataSync())}`);
    tf.dispose([ht, gRef]);
    await rejectsModelError(kept.vjp(dy), 'TANDEM_INPUT_INVALID', 'vjp');
  });

  it("the VJP agrees with finite differences of the engine's own forward", async () => {
    const [b, s, d] = [1, 5, loaded.config.hiddenSize];
    const h = randomArray(b * s * d, 3);
    const dy = randomArray(b * s * d, 4);
    const dir = randomArray(b * s * d, 77);
    const dx = await (await engine.blocksKeep(h, b, s, 0, 5)).vjp(dy);
    const eps = 1e-2;
    const at = async (sign: number): Promise<number> => {
      const out = await engine.blocks(h.map((x, i) => x + sign * eps * dir[i]), b, s, 0, 5);
      let dot = 0;
      for (let i = 0; i < out.length; i++) dot += out[i] * dy[i];
      return dot;
    };
    const numeric = ((await at(1)) - (await at(-1))) / (2 * eps);
    let analytic = 0;
    for (let i = 0; i < dx.length; i++) analytic += dx[i] * dir[i];
    assert.ok(Math.abs(analytic) > 1 && Math.abs(numeric - analytic) < 1e-2 * Math.abs(analytic), `numeric ${numeric}, analytic ${analytic}`);
  });

  describe('a LoRA step', () => {
    const modules = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
    const spec: LoraSpec = { r: 4, scaling: 8 / 4, modules };
    const [b, s] = [2, 10];
    const ids = Int32Array.from({ length: b * s }, (_, i) => (i * 37 + 5) % 512);
    const labels = Int32Array.from(ids);
    labels[3] = -100;
    labels[14] = -100;

    it('gives the loss and the gradient of every A and B of the tfjs LoRA adapter within 1e-4 (relative)', async () => {
      const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: [...modules], initLoraWeights: false }], { seed: 3 });
      try {
        const vars = adapter.trainableVariables();
        const names = [...vars.keys()];
        const params: LoraParams = new Map();
        const pathOf = (n: string): string => n.replace('base_model.model.', '').replace(/\.lora_[AB]\.weight$/, '');
        for (const n of names) {
          const e = params.get(pathOf(n)) ?? { a: new Float32Array(), b: new Float32Array() };
          e[n.includes('lora_A') ? 'a' : 'b'] = vars.get(n)?.dataSync() as Float32Array;
          params.set(pathOf(n), e);
        }
        const ref = gradients(
          () => causalLmLoss(model.forward(tf.tensor2d(ids, [b, s], 'int32'), { hooks: adapter.hooks, training: true }), tf.tensor2d(labels, [b, s], 'int32')).loss,
          names.map((n) => vars.get(n) as tf.Variable),
        );
        const mine = await engine.loraStep(ids, labels, b, s, spec, params);
        assert.equal(mine.count, b * (s - 1) - 2);
        assert.ok(Math.abs(mine.loss - ref.value.dataSync()[0]) < 1e-4);
        assert.equal(mine.grads.size, 5 * modules.length);
        names.forEach((n, i) => {
          const g = mine.grads.get(pathOf(n));
          const got = n.includes('lora_A') ? g?.a : g?.b;
          const want = ref.grads[i]?.dataSync() ?? new Float32Array();
          assert.ok(got && relativeError(got, want) < 1e-4, `${n}: ${got && relativeError(got, want)}`);
        });
        tf.dispose([ref.value, ...ref.grads.filter((t): t is tf.Tensor => t !== undefined)]);
      } finally {
        adapter.dispose();
      }
    });

    it('its gradients agree with finite differences of its own loss', async () => {
      const small: LoraSpec = { r: 2, scaling: 1, modules: ['v_proj', 'down_proj'], layers: [1, 3] };
      const params: LoraParams = new Map();
      let seed = 10;
      for (const layer of [1, 3]) {
        params.set(`model.layers.${layer}.self_attn.v_proj`, { a: randomArray(2 * 64, seed++, 0.3), b: randomArray(32 * 2, seed++, 0.3) });
        params.set(`model.layers.${layer}.mlp.down_proj`, { a: randomArray(2 * 172, seed++, 0.3), b: randomArray(64 * 2, seed++, 0.3) });
      }
      const { grads } = await engine.loraStep(ids, labels, b, s, small, params);
      const eps = 1e-2;
      for (const [path, which, index] of [
        ['model.layers.1.self_attn.v_proj', 'a', 5],
        ['model.layers.3.mlp.down_proj', 'b', 17],
        ['model.layers.3.mlp.down_proj', 'a', 100],
      ] as const) {
        const lossAt = async (delta: number): Promise<number> => {
          const changed: LoraParams = new Map([...params].map(([k, v]) => [k, { a: v.a.slice(), b: v.b.slice() }]));
          (changed.get(path) as { a: Float32Array; b: Float32Array })[which][index] += delta;
          return (await engine.loraStep(ids, labels, b, s, small, changed)).loss;
        };
        const numeric = ((await lossAt(eps)) - (await lossAt(-eps))) / (2 * eps);
        const analytic = (grads.get(path) as { a: Float32Array; b: Float32Array })[which][index];
        assert.ok(Math.abs(numeric - analytic) < 2e-3 + 2e-2 * Math.abs(analytic), `${path}.${which}[${index}]: numeric ${numeric}, analytic ${analytic}`);
      }
    });

    it('refuses labels outside the vocabulary and parameters of the wrong size with typed errors', async () => {
      const params: LoraParams = new Map([['model.layers.0.self_attn.v_proj', { a: new Float32Array(2 * 64), b: new Float32Array(32 * 2) }]]);
      const one: LoraSpec = { r: 2, scaling: 1, modules: ['v_proj'], layers: [0] };
      const bad = Int32Array.from(labels);
      bad[5] = 9999;
      await rejectsModelError(engine.loraStep(ids, bad, b, s, one, params), 'TANDEM_INPUT_INVALID', 'labels');
      const wrong: LoraParams = new Map([['model.layers.0.self_attn.v_proj', { a: new Float32Array(3), b: new Float32Array(32 * 2) }]]);
      await rejectsModelError(engine.loraStep(ids, labels, b, s, one, wrong), 'TANDEM_INPUT_INVALID', 'lora_A');
      await rejectsModelError(engine.loraStep(ids, labels, b, s, { ...one, modules: ['qkv'] as unknown as LoraSpec['modules'] }, params), 'TANDEM_INPUT_INVALID', 'modules', 'qkv');
      await rejectsModelError(engine.loraStep(ids, labels, b, s, { ...one, layers: [5] }, params), 'TANDEM_INPUT_INVALID', 'layers');
    });
  });

  it('refuses token ids outside the vocabulary and inputs of the wrong length before running', async () => {
    await rejectsModelError(engine.logits(Int32Array.from([1, 600]), 1, 2), 'TANDEM_INPUT_INVALID', 'input_ids', '600');
    await rejectsModelError(engine.logits(Int32Array.from([1, 2, 3]), 1, 2), 'TANDEM_INPUT_INVALID', 'input_ids');
    await rejectsModelError(engine.blocks(new Float32Array(10), 1, 2, 0, 1), 'TANDEM_INPUT_INVALID', 'field h');
    await rejectsModelError(engine.logits(new Int32Array(513), 1, 513), 'TANDEM_INPUT_INVALID', 'max_position_embeddings');
  });
});
