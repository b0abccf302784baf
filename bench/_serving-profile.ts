// Where a serving step's time goes, without HTTP: the bench's ~25M random Llama (or --quick
// stories260K), batched steps on tfjs (batchedLastLogits) and on ONNX Runtime
// (OrtServingEngine), for 32 rows over 8 adapters, 32 rows of one adapter, 32 base rows and one
// row. `node --import tsx bench/_serving-profile.ts [--quick] [--engine tfjs|ort|both]`.
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { mkdtemp, rm } from 'node:fs/promises';
import { batchedLastLogits, createAdapter, initBackend, KvCache, LlamaModel, loadModelFolder, loraParamsOf, ortLoraPlan, OrtServingEngine, ServingLora } from '../model/index.ts';
import type { PeftAdapter } from '../model/index.ts';
import { randomModelDir } from './_random-model.ts';

const FIXTURE = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');
const args = process.argv.slice(2);
const quick = args.includes('--quick');
const which = args.includes('--engine') ? args[args.indexOf('--engine') + 1] : 'both';
const PROMPT = 8;
const STEPS = 8;

await initBackend({ log: (l) => process.stdout.write(`${l}\n`) });
const work = await mkdtemp(join(tmpdir(), 'tandem-serving-profile-'));
let dir = FIXTURE;
if (!quick) {
  dir = await randomModelDir(work);
}
const loaded = await loadModelFolder(dir);
const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
const adapters: PeftAdapter[] = Array.from({ length: 8 }, (_, i) => createAdapter(model, [{ method: 'lora', r: 8, loraAlpha: 16, initLoraWeights: false, targetModules: ['q_proj', 'v_proj', 'o_proj'] }], { seed: 100 + i }));
const cases: [string, number, (i: number) => number | undefined][] = [['32 rows, 8 adapters', 32, (i) => i % 8], ['32 rows, 1 adapter', 32, () => 0], ['32 rows, base', 32, () => undefined], ['1 row, 1 adapter', 1, () => 0]];
const ids = (i: number, n: number) => Array.from({ length: n }, (_, t) => 3 + ((i * 7 + t * 13) % 400));

if (which !== 'ort') {
  for (const [name, rows, adapterOf] of cases) {
    const caches = Array.from({ length: rows }, () => new KvCache());
    const row = (i: number, n: number) => ({ ids: ids(i, n), cache: caches[i], hooks: adapterOf(i) === undefined ? undefined : adapters[adapterOf(i) as number].hooks });
    let t = performance.now();
    batchedLastLogits(model, Array.from({ length: rows }, (_, i) => row(i, PROMPT)));
    const prefill = performance.now() - t;
    t = performance.now();
    for (let s = 0; s < STEPS; s++) batchedLastLogits(model, Array.from({ length: rows }, (_, i) => row(i, 1)));
    const step = (performance.now() - t) / STEPS;
    process.stdout.write(`tfjs ${name.padEnd(22)} prefill ${prefill.toFixed(1)} ms; decode step ${step.toFixed(1)} ms = ${(rows / step * 1000).toFixed(0)} tokens/s\n`);
    for (const c of caches) c.dispose();
  }
}
if (which !== 'tfjs') {
  const engine = await OrtServingEngine.create(loaded.config, loaded.weights);
  const loras = adapters.map((a) => {
    const p = ortLoraPlan(a, loaded.config);
    if (!p.plan) throw new Error(p.reason);
    return new ServingLora(loaded.config, p.plan.spec, loraParamsOf(p.plan));
  });
  for (const [name, rows, adapterOf] of cases) {
    for (let rep = 0; rep < 2; rep++) {
      const seqs = Array.from({ length: rows }, (_, i) => engine.sequence(PROMPT + STEPS + 1, adapterOf(i) === undefined ? undefined : loras[adapterOf(i) as number]));
      let t = performance.now();
      await engine.step(seqs.map((sequence, i) => ({ ids: ids(i, PROMPT), sequence })));
      const prefill = performance.now() - t;
      const before = { ...engine.timings };
      t = performance.now();
      for (let s = 0; s < STEPS; s++) await engine.step(seqs.map((sequence, i) => ({ ids: ids(i + s, 1), sequence })));
      const step = (performance.now() - t) / STEPS;
      const d = (k: 'packMs' | 'graphMs' | 'unpackMs') => ((engine.timings[k] - before[k]) / STEPS).toFixed(1);
      if (rep === 1) process.stdout.write(`ort  ${name.padEnd(22)} prefill ${prefill.toFixed(1)} ms; decode step ${step.toFixed(1)} ms = ${(rows / step * 1000).toFixed(0)} tokens/s (pack ${d('packMs')}, graph ${d('graphMs')}, unpack ${d('unpackMs')} ms)\n`);
    }
  }
  await engine.dispose();
}
for (const a of adapters) a.dispose();
model.dispose();
await rm(work, { recursive: true, force: true });
