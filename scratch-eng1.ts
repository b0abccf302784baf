import { LlamaModel, loadModelFolder, tf, useBackend } from './model/index.ts';
import { OrtLlama } from './model/engine/ort-llama.ts';
await useBackend('cpu');
const m = await loadModelFolder('./test/fixtures/stories260K');
const w = new Map([...m.weights].map(([k, v]) => [k, { shape: v.shape, data: v.data as Float32Array }]));
const eng = await OrtLlama.create(m.config, w);
const ids = Int32Array.from([1, 403, 407, 261, 378, 5, 9, 100]);
const t0 = performance.now();
const lo = await eng.logits(ids, 2, 4);
console.log('ort ms', performance.now() - t0);
const model = LlamaModel.fromArrays(m.config, w);
const ref = model.forward(tf.tensor2d(ids, [2, 4], 'int32')).dataSync();
let md = 0; for (let i = 0; i < ref.length; i++) md = Math.max(md, Math.abs(ref[i] - lo[i]));
console.log('maxdiff', md, lo.length, ref.length);
import { createAdapter, causalLmLoss, gradients, tapedForward } from './model/index.ts';
{
  const b = 2, s = 4, d = m.config.hiddenSize;
  const h = new Float32Array(b * s * d).map((_, i) => Math.sin(i * 0.37));
  const dy = new Float32Array(b * s * d).map((_, i) => Math.cos(i * 0.11));
  const kept = await eng.blocksKeep(h, b, s, 1, 4);
  const gx = await kept.vjp(dy);
  const ht = tf.tensor3d(h, [b, s, d]);
  const tp = tapedForward(() => model.blocks(ht, 1, 4), [ht]);
  const out = tp.output.dataSync();
  let mo = 0; for (let i = 0; i < out.length; i++) mo = Math.max(mo, Math.abs(out[i] - kept.output[i]));
  const [gref] = tp.vjp(tf.tensor3d(dy, [b, s, d]));
  const gr = gref.dataSync();
  let mg = 0, mx = 0; for (let i = 0; i < gr.length; i++) { mg = Math.max(mg, Math.abs(gr[i] - gx[i])); mx = Math.max(mx, Math.abs(gr[i])); }
  console.log('blocks out diff', mo, 'vjp diff', mg, 'max |g|', mx);
}
{
  const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj', 'o_proj'], initLoraWeights: false }], { seed: 3 });
  const vars = adapter.trainableVariables();
  console.log([...vars.keys()].slice(0, 4));
}
{
  const mods = ['q_proj', 'v_proj', 'down_proj', 'o_proj', 'gate_proj'] as const;
  const adapter = createAdapter(model, [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: [...mods], initLoraWeights: false }], { seed: 3 });
  const vars = adapter.trainableVariables();
  const names = [...vars.keys()];
  const b = 2, s = 6;
  const ids2 = Int32Array.from({ length: b * s }, (_, i) => (i * 37 + 5) % 512);
  const labels = Int32Array.from(ids2); labels[3] = -100;
  const idsT = tf.tensor2d(ids2, [b, s], 'int32');
  const { value, grads } = gradients(() => causalLmLoss(model.forward(idsT, { hooks: adapter.hooks, training: true }), tf.tensor2d(labels, [b, s], 'int32')).loss, names.map((n) => vars.get(n)!));
  const params = new Map<string, { a: Float32Array; b: Float32Array }>();
  for (const n of names) {
    const path = n.replace('base_model.model.', '').replace(/\.lora_[AB]\.weight$/, '');
    const e = params.get(path) ?? { a: new Float32Array(), b: new Float32Array() };
    if (n.includes('lora_A')) e.a = vars.get(n)!.dataSync() as Float32Array; else e.b = vars.get(n)!.dataSync() as Float32Array;
    params.set(path, e);
  }
  const r = await eng.loraStep(ids2, labels, b, s, { r: 4, scaling: 2, modules: mods }, params);
  console.log('loss', value.dataSync()[0], r.loss, r.count);
  let worst = 0;
  names.forEach((n, i) => {
    const path = n.replace('base_model.model.', '').replace(/\.lora_[AB]\.weight$/, '');
    const mine = n.includes('lora_A') ? r.grads.get(path)!.a : r.grads.get(path)!.b;
    const ref = grads[i]!.dataSync();
    let md = 0, mx = 0; for (let j = 0; j < ref.length; j++) { md = Math.max(md, Math.abs(ref[j] - mine[j])); mx = Math.max(mx, Math.abs(ref[j])); }
    worst = Math.max(worst, md / mx);
  });
  console.log('worst rel grad diff', worst);
}
