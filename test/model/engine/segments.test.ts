// The segment graphs' inputs (the cloud's held adapters on ONNX Runtime) are checked before ORT
// sees them, each refusal a typed error on `adapters` (or the field it names); and the
// sessions of those graphs stay bounded however many adapter layouts tenants ask for.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { MAX_BOUNDED_SESSIONS } from '../../../model/engine/ort-llama.ts';
import { modulePath } from '../../../model/engine/index.ts';
import type { OrtLlama, SegmentAdapters } from '../../../model/engine/index.ts';
import { LINEAR_MODULES, ModelError, Rng } from '../../../model/index.ts';
import type { LoadedModel } from '../../../model/index.ts';
import { storiesOnOrt } from './stories-on-ort.ts';

const RANGE = { start: 1, end: 4 };
const SEQ = 5;

function random(n: number, rng: Rng): Float32Array {
  return Float32Array.from({ length: n }, () => rng.normal() * 0.1);
}

describe('segment adapters on ONNX Runtime', () => {
  let loaded: LoadedModel;
  let engine: OrtLlama;
  let hidden: number;
  let h: Float32Array;
  const rng = new Rng(3);
  /** A LoRA of rank r on `paths` for S segments, [out, in] from the weights. */
  const lora = (paths: string[], S: number, r: number): NonNullable<SegmentAdapters['lora']> => ({
    r, scales: Float32Array.from({ length: S }, () => 2),
    factors: new Map(paths.map((p) => {
      const [out, inF] = loaded.weights.get(`${p}.weight`)?.shape ?? [0, 0];
      return [p, { a: random(S * r * inF, rng), b: random(S * out * r, rng) }];
    })),
  });

  before(async () => {
    ({ loaded, engine } = await storiesOnOrt());
    hidden = loaded.config.hiddenSize;
    h = random(2 * SEQ * hidden, rng);
  });

  const refused = async (adapters: SegmentAdapters, pattern: RegExp, field = 'adapters', batch = 2): Promise<void> => {
    await assert.rejects(engine.blocksSegments(h.subarray(0, batch * SEQ * hidden), batch, SEQ, RANGE.start, RANGE.end, adapters), (err: unknown) => {
      assert.ok(err instanceof ModelError, String(err));
      assert.equal(err.code, 'TANDEM_INPUT_INVALID');
      assert.equal(err.field, field, err.message);
      assert.match(err.message, pattern);
      return true;
    });
  };

  it('refuses what no graph should see: a module that is not linear, one outside the range, nothing, both methods on one module, a bad count or length', async () => {
    const q = 'model.layers.1.self_attn.q_proj';
    await refused({ segments: 2, ia3: new Map([['model.layers.1.input_layernorm', { feedforward: false, scale: new Float32Array(2 * hidden) }]]) }, /not a linear module/);
    await refused({ segments: 2, lora: lora(['model.layers.0.self_attn.q_proj'], 2, 2) }, /not a linear module of blocks \[1, 4\)/);
    await refused({ segments: 2, lora: { r: 2, scales: new Float32Array(2), factors: new Map() } }, /name no module/);
    const both = lora([q], 2, 2);
    await refused({ segments: 2, lora: both, ia3: new Map([[q, { feedforward: false, scale: new Float32Array(2 * hidden) }]]) }, /both LoRA and \(IA\)\^3/);
    await refused({ segments: 3, lora: lora([q], 3, 2) }, /dividing the batch 2/, 'segments');
    const short = lora([q], 2, 2);
    short.factors.get(q)!.a = short.factors.get(q)!.a.subarray(1);
    await refused({ segments: 2, lora: short }, /expected \d+ values/, `${q}.lora_A`);
    await assert.rejects(engine.blocksRecomputeBackward(h.subarray(0, 2 * SEQ * hidden), h.subarray(0, 2 * SEQ * hidden), 2, SEQ, 2, 2, { segments: 2, lora: lora([q], 2, 2) }), /not a linear module of blocks \[2, 2\)/);
  });

  it('one graph serves every rank, and at most MAX_BOUNDED_SESSIONS of the bounded graphs stay built', async () => {
    const q = 'model.layers.1.self_attn.q_proj';
    const before = engine.sessionKeys.filter((k) => k.startsWith('segment-blocks:')).length;
    for (const r of [1, 2, 5]) await engine.blocksSegments(h, 2, SEQ, RANGE.start, RANGE.end, { segments: 2, lora: lora([q], 2, r) });
    assert.equal(engine.sessionKeys.filter((k) => k.startsWith('segment-blocks:')).length, before + 1, 'ranks 1, 2 and 5 on q_proj share one session');
    const layouts = LINEAR_MODULES.map((m) => modulePath(2, m));
    for (const path of layouts) await engine.blocksSegments(h, 2, SEQ, RANGE.start, RANGE.end, { segments: 2, lora: lora([path], 2, 2) });
    const bounded = engine.sessionKeys.filter((k) => k.startsWith('segment-blocks:') || k.startsWith('blocks-recompute-backward:'));
    assert.equal(bounded.length, MAX_BOUNDED_SESSIONS, `bounded sessions: ${bounded.join(' ')}`);
    // The most recent layout is among them; the first one was released.
    assert.ok(bounded.some((k) => k.includes('model.layers.2.mlp.down_proj')));
    assert.ok(!bounded.some((k) => k.includes('model.layers.1.self_attn.q_proj')));
  });
});
