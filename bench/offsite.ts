// Offsite-Tuning on stories260K (5 blocks) with B = T = 1: the middle's 3 blocks become an
// emulator keeping 2 (blocks 1 and 3), with and without distillation, and adapters (the
// `block` adapter of the paper, and LoRA) are fine-tuned on text the model never saw
// (tinyshakespeare). Prints the paper's table: validation perplexity of the full model
// zero-shot, the emulator zero-shot, the emulator fine-tuned, the plug-in (the adapter in the
// full model) and full fine-tuning (the same adapter trained on the full model).
//
//   npm run bench -- offsite [--data PATH] [--steps N] [--distill-steps N] [--chars N] [--quick]
//
// Distillation needs public text of the model's own domain; none ships offline, so the
// bench samples it from stories260K itself (temperature 1), as a data-free stand-in.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { trainOffsite } from '../edge-client/index.ts';
import { buildEmulator, readBundle, writeEmulatedModelFolder } from '../emulator/index.ts';
import type { BundleManifest } from '../emulator/index.ts';
import { DEFAULT_RECIPE, LlamaModel, Rng, evaluateLocal, generate, initBackend, loadModelFolder, loadTokenizer, trainLocal } from '../model/index.ts';
import type { MethodSpec } from '../model/index.ts';

const root = join(import.meta.dirname, '..');
const fixture = join(root, 'test', 'fixtures', 'stories260K');

function flag(args: string[], name: string, fallback: string): string {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

interface Method {
  name: string;
  spec: MethodSpec;
  lr: number;
}

const sec = (t0: number) => (performance.now() - t0) / 1000;

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const dataPath = flag(args, '--data', join(root, '..', 'shared', 'fixtures', 'data', 'tinyshakespeare', 'input.txt'));
  const steps = Number(flag(args, '--steps', quick ? '10' : '80'));
  const distillSteps = Number(flag(args, '--distill-steps', quick ? '10' : '160'));
  const chars = Number(flag(args, '--chars', quick ? '30000' : '120000'));
  const seqLen = 128;
  const batchSize = 4;
  const cut = { bottom: 1, top: 1 };
  const keep = 2;
  const backend = await initBackend();
  const began = performance.now();
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-offsite-'));
  try {
    // Text the model never saw: the first `chars` of tinyshakespeare, the last tenth held out.
    const text = readFileSync(dataPath, 'utf8').slice(0, chars);
    const cutAt = text.lastIndexOf('\n', Math.floor(text.length * 0.9));
    const trainFile = join(work, 'shakespeare-train.txt');
    const valFile = join(work, 'shakespeare-val.txt');
    await writeFile(trainFile, text.slice(0, cutAt));
    await writeFile(valFile, text.slice(cutAt + 1));

    // Public text for distillation, sampled from the model.
    const t0 = performance.now();
    const loaded = await loadModelFolder(fixture);
    const tokenizer = await loadTokenizer(fixture);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const rng = new Rng(7);
    const stories: string[] = [];
    for (let i = 0; i < (quick ? 8 : 48); i++) {
      const r = generate(model, [tokenizer.bosTokenId ?? 1], { maxNewTokens: 192, temperature: 1, seed: rng.nextU32() });
      stories.push(tokenizer.decode(r.generatedIds, { skipSpecialTokens: true }));
    }
    model.dispose();
    const publicFile = join(work, 'stories260K-samples.txt');
    await writeFile(publicFile, stories.join('\n\n'));
    process.stdout.write(`sampled ${stories.length} stories (${stories.join('').length} chars) for distillation in ${sec(t0).toFixed(0)} s\n`);

    const emulators: { name: string; distill: boolean; dir: string; manifest: BundleManifest; modelDir: string }[] = [];
    for (const distill of [false, true]) {
      const t = performance.now();
      const dir = join(work, distill ? 'bundle-distilled' : 'bundle-drop');
      const manifest = await buildEmulator({
        modelDir: fixture, keep, cut, outDir: dir, evalFile: valFile, seqLen,
        ...(distill ? { distill: { dataFile: publicFile, steps: distillSteps, batchSize, seqLen, lr: 1e-3 } } : {}),
      });
      const modelDir = join(work, `${distill ? 'distilled' : 'drop'}-model`);
      await writeEmulatedModelFolder(await readBundle(dir), modelDir);
      emulators.push({ name: distill ? 'drop+distill' : 'drop', distill, dir, manifest, modelDir });
      const f = manifest.fidelity;
      process.stdout.write(`emulator ${distill ? 'with' : 'without'} distillation: ppl full ${f.fullPerplexity?.toFixed(2)} emulated ${f.emulatorPerplexity?.toFixed(2)}, middle cosine ${f.middleCosine?.toFixed(4)}, ${(100 * f.sizeRatio).toFixed(1)}% of the middle (${sec(t).toFixed(0)} s)\n`);
    }

    // int8 weights: the layer-dropped emulator quantized, for its fidelity and size.
    const int8 = await buildEmulator({ modelDir: fixture, keep, cut, outDir: join(work, 'bundle-int8'), evalFile: valFile, seqLen, quantize: 'int8' });
    process.stdout.write(`emulator without distillation, int8: emulated ppl ${int8.fidelity.emulatorPerplexity?.toFixed(2)}, middle cosine ${int8.fidelity.middleCosine?.toFixed(4)}, ${(100 * int8.fidelity.sizeRatio).toFixed(1)}% of the middle\n`);

    const recipe = { ...DEFAULT_RECIPE, steps, batchSize, seqLen, valFraction: 0, evalEvery: 0, saveEvery: 0, warmupSteps: 0, schedule: 'cosine' as const };
    const evaluate = async (modelDir: string, adapterDir?: string) =>
      (await evaluateLocal({ modelDir, dataFile: valFile, seqLen, batchSize: 8, ...(adapterDir ? { adapterDir } : {}) })).perplexity;
    const fullZeroShot = await evaluate(fixture);
    const methods: Method[] = [
      { name: 'block', spec: { method: 'block' }, lr: 1e-3 },
      { name: 'lora', spec: { method: 'lora', r: 8, loraAlpha: 16, targetModules: 'all-linear' }, lr: 1e-2 },
    ];
    const edgeLayers = [0, loaded.config.numHiddenLayers - 1];
    const results: Record<string, unknown>[] = [];
    for (const m of methods) {
      const t = performance.now();
      const fullRun = await trainLocal({ ...recipe, lr: m.lr, modelDir: fixture, dataFile: trainFile, outDir: join(work, `full-${m.name}`), methods: [{ ...m.spec, layersToTransform: edgeLayers }] });
      const fullFineTuned = await evaluate(fixture, fullRun.adapterDir);
      process.stdout.write(`${m.name}: full fine-tuning ${fullFineTuned.toFixed(2)} (${sec(t).toFixed(0)} s)\n`);
      for (const e of emulators) {
        const t1 = performance.now();
        const offsite = await trainOffsite({ ...recipe, lr: m.lr, bundleDir: e.dir, dataFile: trainFile, outDir: join(work, `offsite-${m.name}-${e.name}`), methods: [m.spec] });
        const row = {
          method: m.name,
          emulator: e.name,
          fullZeroShot,
          emulatorZeroShot: await evaluate(e.modelDir),
          emulatorFineTuned: await evaluate(e.modelDir, offsite.emulatedAdapterDir),
          plugIn: await evaluate(fixture, offsite.adapterDir),
          fullFineTuning: fullFineTuned,
          plugInShareOfGain: 0,
        };
        row.plugInShareOfGain = Math.log(fullZeroShot / row.plugIn) / Math.log(fullZeroShot / fullFineTuned);
        results.push(row);
        process.stdout.write(`${m.name} / ${e.name}: ${JSON.stringify(row)} (${sec(t1).toFixed(0)} s)\n`);
      }
    }
    // The paper's full fine-tuning: every block of the full model trained.
    const t2 = performance.now();
    const allBlocks = await trainLocal({ ...recipe, lr: 1e-3, modelDir: fixture, dataFile: trainFile, outDir: join(work, 'full-all-blocks'), methods: [{ method: 'block', layersToTransform: [...Array(loaded.config.numHiddenLayers).keys()] }] });
    const fullFineTuningAllBlocks = await evaluate(fixture, allBlocks.adapterDir);
    process.stdout.write(`full fine-tuning of every block: ${fullFineTuningAllBlocks.toFixed(2)} (${sec(t2).toFixed(0)} s)\n\n`);

    printTable(results, fullFineTuningAllBlocks, [...emulators, { name: 'drop+int8', manifest: int8 }], steps, distillSteps);
    return {
      backend: backend.name,
      model: 'stories260K',
      contentHash: emulators[0].manifest.baseModel.contentHash,
      cut,
      keep,
      keptLayers: emulators[0].manifest.keptLayers,
      data: { path: dataPath, chars, trainChars: cutAt, validationChars: text.length - cutAt - 1 },
      recipe: { steps, batchSize, seqLen, optimizer: 'adamw', schedule: 'cosine', lr: Object.fromEntries(methods.map((m) => [m.name, m.lr])), distillSteps, distillLambda: 30, distillData: 'stories sampled from stories260K (temperature 1)' },
      emulators: [...emulators.map((e) => ({ name: e.name, fidelity: e.manifest.fidelity, distillation: e.manifest.distillation })), { name: 'drop+int8', fidelity: int8.fidelity, quantization: int8.quantization }],
      results,
      fullFineTuningAllBlocks,
      seconds: sec(began),
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

function printTable(results: Record<string, unknown>[], allBlocks: number, emulators: { name: string; manifest: BundleManifest }[], steps: number, distillSteps: number): void {
  const cols = results.map((r) => `${r.method}, ${r.emulator}`);
  const rows: [string, string][] = [
    ['full model zero-shot', 'fullZeroShot'],
    ['emulator zero-shot', 'emulatorZeroShot'],
    ['emulator fine-tuned', 'emulatorFineTuned'],
    ['plug-in', 'plugIn'],
    ['full fine-tuning', 'fullFineTuning'],
  ];
  const w = 22;
  const line = (label: string, cells: string[]) => `${label.padEnd(24)}${cells.map((c) => c.padStart(w)).join('')}\n`;
  process.stdout.write(`validation perplexity on held-out tinyshakespeare, stories260K, B = T = 1, emulator keeps blocks ${emulators[0].manifest.keptLayers.join(', ')} of 1..3, ${steps} steps (lower is better)\n`);
  process.stdout.write(line('', cols));
  for (const [label, key] of rows) process.stdout.write(line(label, results.map((r) => (r[key] as number).toFixed(2))));
  process.stdout.write(`full fine-tuning of every block (block adapter on blocks 0-4): ${allBlocks.toFixed(2)}\n`);
  for (const e of emulators) {
    const f = e.manifest.fidelity;
    process.stdout.write(`emulator ${e.name.padEnd(13)} ppl ${f.emulatorPerplexity?.toFixed(2)} (full ${f.fullPerplexity?.toFixed(2)}), middle cosine ${f.middleCosine?.toFixed(4)}, ${(f.emulatorBytes / 1024).toFixed(0)} KiB vs ${(f.fullMiddleBytes / 1024).toFixed(0)} KiB${e.manifest.distillation ? `, distilled ${distillSteps} steps` : ''}\n`);
  }
  const beats = results.filter((r) => (r.plugIn as number) < (r.emulatorFineTuned as number)).length;
  process.stdout.write(`plug-in beats emulator fine-tuned in ${beats} of ${results.length} settings\n`);
  process.stdout.write(`plug-in's share of full fine-tuning's gain over zero-shot (log perplexity): ${results.map((r) => `${r.method}, ${r.emulator} ${(100 * (r.plugInShareOfGain as number)).toFixed(0)}%`).join('; ')}\n`);
}
