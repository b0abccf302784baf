// Child of `npm run bench -- engine`: one LoRA step (r 8 on q_proj and v_proj) of the
// SmolLM-135M shape on ORT at 1 x SEQ, printing its peak RSS as JSON on the last line.
//   node --import tsx bench/_engine-memory.ts LAYERS SEQ THREADS
import { OrtLlama } from '../model/index.ts';
import { SMOLLM_135M_SHAPE, llamaConfig, randomWeights } from '../model/testing.ts';
import type { LoraParams } from '../model/index.ts';

const [layers, seq, threads] = process.argv.slice(2).map(Number);
const config = llamaConfig({ ...SMOLLM_135M_SHAPE, layers });
const weights = randomWeights(config, 1);
const engine = await OrtLlama.create(config, weights, { threads });
const params: LoraParams = new Map();
for (let i = 0; i < layers; i++) {
  params.set(`model.layers.${i}.self_attn.q_proj`, { a: new Float32Array(8 * 576).fill(0.01), b: new Float32Array(576 * 8) });
  params.set(`model.layers.${i}.self_attn.v_proj`, { a: new Float32Array(8 * 576).fill(0.01), b: new Float32Array(192 * 8) });
}
const ids = Int32Array.from({ length: seq }, (_, i) => (i * 7919) % config.vocabSize);
const t0 = performance.now();
const { loss } = await engine.loraStep(ids, ids, 1, seq, { r: 8, scaling: 2, modules: ['q_proj', 'v_proj'] }, params);
const seconds = (performance.now() - t0) / 1000;
await engine.dispose();
process.stdout.write(
  `${JSON.stringify({ layers, batch: 1, seq, ok: Number.isFinite(loss), loss, firstStepSeconds: seconds, peakRssBytes: process.resourceUsage().maxRSS * 1024, weightBytes: [...weights.values()].reduce((n, w) => n + w.data.byteLength, 0) })}\n`,
);
