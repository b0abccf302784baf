// `tandem emulate`: builds an emulator bundle from a model folder: uniform layer drop of the
// middle, optional distillation on public text, optional int8 quantization, a fidelity
// report, and the bundle written with its checksum.
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import {
  CONFIG_FILE, LlamaModel, OrtLlama, TOKENIZER_CONFIG_FILE, checkTokenizerFits, openEngine, TOKENIZER_FILE, initBackend, layerOf, loadModelFolder, loadTokenizer, onEdge, parseModelConfig, renameLayer, prepareData, readDataset,
} from '../model/index.ts';
import type { LoadedModel, Row, Tokenizer, Weights } from '../model/index.ts';
import { MANIFEST_FILE, emulatedRawConfig, emulatedWeights, encodeBundle, encodeEmulatorWeights, writeBundleFiles } from './bundle.ts';
import type { BundleManifest, Distillation, Fidelity, ManifestBody } from './bundle.ts';
import { DEFAULT_DISTILL_LAMBDA, distillEmulator } from './distill.ts';
import { EmulatorError } from './errors.ts';
import { measureFidelity } from './fidelity.ts';
import { emulatedLayerCount, emulatorLayout, toEmulatedLayer } from './layer-drop.ts';
import type { Cut, EmulatorLayout } from './layer-drop.ts';
import { QUANTIZATIONS, SCALE_SUFFIX, roundTrip } from './quantize.ts';
import type { Quantization } from './quantize.ts';

export const DEFAULT_EMULATOR_CUT: Cut = { bottom: 2, top: 2 };

export interface DistillSettings {
  /** Public text (.txt or .jsonl) the kept blocks learn to imitate the middle on. */
  dataFile: string;
  steps: number;
  lambda?: number;
  lr?: number;
  batchSize?: number;
  seqLen?: number;
  seed?: number;
}

export interface BuildEmulatorOptions {
  modelDir: string;
  /** The model's id in the manifest; the folder's base name by default. */
  modelId?: string;
  keep: number;
  cut?: Cut;
  distill?: DistillSettings;
  /** Text for the fidelity report; by default the distillation data's held-out tenth. */
  evalFile?: string;
  /** Rows of `seqLen` tokens the fidelity report uses at most. */
  evalRows?: number;
  /** Tokens per row for distillation and the fidelity report (128); distill.seqLen wins for distillation. */
  seqLen?: number;
  quantize?: Quantization | null;
  outDir: string;
  backend?: string;
  /** The engine of the frozen work (teacher, bottom, fidelity): a name or 'auto'; absent: TANDEM_ENGINE when set, else tfjs. The kept blocks distill on tfjs. */
  engine?: string;
  /** Receives the backend and engine choice lines. */
  log?: (line: string) => void;
  onEvent?: (e: EmulateEvent) => void;
}

export type EmulateEvent =
  | { type: 'start'; model: string; layers: number; cut: Cut; kept: number[] }
  | { type: 'distill'; step: number; steps: number; loss: number; lmLoss: number; kdLoss: number }
  | { type: 'done'; dir: string; manifest: BundleManifest };

const DEFAULTS = { lambda: DEFAULT_DISTILL_LAMBDA, lr: 1e-3, batchSize: 8, seqLen: 128, seed: 0 };

function positiveInt(v: number, field: string, min = 1): void {
  if (!Number.isInteger(v) || v < min) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `${field} must be an integer ≥ ${min}, got ${v}`, { field });
}

async function fileSha256(file: string): Promise<string> {
  return createHash('sha256').update(await readFile(file)).digest('hex');
}

async function readIfExists(path: string): Promise<Uint8Array | undefined> {
  if (!(await stat(path).then((s) => s.isFile(), () => false))) return undefined;
  return new Uint8Array(await readFile(path));
}

function partition(loaded: LoadedModel, layout: EmulatorLayout): { edge: Weights; kept: Weights; middleBytes: number } {
  const { cut, numLayers } = layout;
  const edge: Weights = new Map();
  const kept: Weights = new Map();
  let middleBytes = 0;
  const keep = new Set(layout.kept);
  for (const [name, w] of loaded.weights) {
    if (onEdge(name, cut, numLayers)) {
      edge.set(name, w);
      continue;
    }
    middleBytes += w.data.length * 4;
    if (keep.has(layerOf(name) as number)) kept.set(name, { shape: [...w.shape], data: Float32Array.from(w.data) });
  }
  return { edge, kept, middleBytes };
}

/** Rows of a data file for distillation and evaluation (plain text is chunked to seqLen). */
async function rowsOf(file: string, tokenizer: Tokenizer, seqLen: number, valFraction: number, seed: number): Promise<{ train: Row[]; validation: Row[] }> {
  const data = prepareData(await readDataset(file), tokenizer, { seqLen, valFraction, seed, pack: true });
  return { train: data.train, validation: data.validation };
}

/** Builds an emulator bundle in `outDir` and returns its manifest. */
export async function buildEmulator(options: BuildEmulatorOptions): Promise<BundleManifest> {
  const cut = options.cut ?? DEFAULT_EMULATOR_CUT;
  const quantize = options.quantize ?? null;
  if (quantize !== null && !QUANTIZATIONS.includes(quantize)) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `quantize must be one of ${QUANTIZATIONS.join(', ')}, got ${JSON.stringify(quantize)}`, { field: 'quantize' });
  const evalRows = options.evalRows ?? 64;
  positiveInt(evalRows, 'eval_rows');
  const d = options.distill ? { ...DEFAULTS, ...(options.seqLen === undefined ? {} : { seqLen: options.seqLen }), ...Object.fromEntries(Object.entries(options.distill).filter(([, v]) => v !== undefined)) } as Required<DistillSettings> : undefined;
  if (d) {
    positiveInt(d.steps, 'steps');
    positiveInt(d.batchSize, 'batch_size');
    positiveInt(d.seqLen, 'seq_len', 2);
    if (!(Number.isFinite(d.lambda) && d.lambda >= 0)) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `lambda must be a number ≥ 0, got ${d.lambda}`, { field: 'lambda' });
    if (!(Number.isFinite(d.lr) && d.lr > 0)) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `lr must be a number > 0, got ${d.lr}`, { field: 'lr' });
  }
  await initBackend({ backend: options.backend, log: options.log });
  const loaded = await loadModelFolder(options.modelDir);
  // The tokenizer is needed only to read text: distillation or a fidelity report.
  const tokenizer = d || options.evalFile ? await loadTokenizer(options.modelDir) : undefined;
  if (tokenizer) checkTokenizerFits(tokenizer, loaded.config.vocabSize);
  const layout = emulatorLayout(loaded.config.numHiddenLayers, cut, options.keep);
  const modelId = options.modelId ?? basename(resolve(options.modelDir));
  options.onEvent?.({ type: 'start', model: modelId, layers: layout.numLayers, cut, kept: layout.kept });
  const rawConfig = JSON.parse(Buffer.from(await readFile(join(options.modelDir, CONFIG_FILE))).toString('utf8')) as Record<string, unknown>;
  const { edge, kept, middleBytes } = partition(loaded, layout);

  const seqLen = d?.seqLen ?? options.seqLen ?? DEFAULTS.seqLen;
  positiveInt(seqLen, 'seq_len', 2);
  const distillRows = d && tokenizer ? await rowsOf(d.dataFile, tokenizer, seqLen, options.evalFile ? 0 : 0.1, d.seed) : undefined;
  const evalRowsOf = options.evalFile && tokenizer ? (await rowsOf(options.evalFile, tokenizer, seqLen, 0, 0)).train : distillRows?.validation;
  const evalName = options.evalFile ? basename(options.evalFile) : d ? `${basename(d.dataFile)} (held-out tenth)` : null;

  const full = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const emuConfig = parseModelConfig(emulatedRawConfig(rawConfig, layout));
  let distillation: Distillation | null = null;
  let fidelityFigures: Awaited<ReturnType<typeof measureFidelity>> | undefined;
  const opened = await openEngine(loaded.config, () => loaded.weights, options.engine, options.log);
  let emulatorFile: Uint8Array;
  let finalKept: Weights;
  try {
    if (d && distillRows) {
      const emulated = LlamaModel.fromArrays(emuConfig, emulatedWeights(layout, edge, kept));
      try {
        const r = await distillEmulator(full, emulated, layout, distillRows.train, {
          steps: d.steps, lambda: d.lambda, lr: d.lr, batchSize: d.batchSize, seed: d.seed, engine: opened.engine,
          onStep: (e) => options.onEvent?.({ type: 'distill', ...e }),
        });
        distillation = { data: basename(d.dataFile), dataSha256: await fileSha256(d.dataFile), steps: d.steps, lambda: d.lambda, lr: d.lr, batchSize: d.batchSize, seqLen: d.seqLen, seed: d.seed, finalLoss: r.finalLoss, finalLmLoss: r.finalLmLoss, finalKdLoss: r.finalKdLoss };
        // The trained kept blocks, back under the full model's names.
        for (const name of kept.keys()) {
          const j = toEmulatedLayer(layout, layerOf(name) as number) as number;
          const v = emulated.weight(renameLayer(name, () => j));
          kept.set(name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) });
        }
      } finally {
        emulated.dispose();
      }
    }
    // Fidelity is measured on what the bundle ships: the quantized weights when quantizing.
    finalKept = roundTrip(kept, quantize);
    emulatorFile = encodeEmulatorWeights(kept, quantize, `sha256:${loaded.contentHash}`);
    if (evalRowsOf && evalRowsOf.length > 0) {
      const emuWeights = emulatedWeights(layout, edge, finalKept);
      const emulated = LlamaModel.fromArrays(emuConfig, emuWeights);
      const emuEngine = opened.engine ? await OrtLlama.create(emuConfig, emuWeights, { threads: opened.engine.threads, provider: opened.engine.provider }) : undefined;
      try {
        fidelityFigures = await measureFidelity(full, emulated, layout, evalRowsOf.slice(0, evalRows), 8, opened.engine && emuEngine ? { full: opened.engine, emulated: emuEngine } : undefined);
      } finally {
        await emuEngine?.dispose();
        emulated.dispose();
      }
    }
  } finally {
    await opened.close();
    full.dispose();
  }
  const fidelity: Fidelity = {
    data: fidelityFigures ? evalName : null,
    tokens: fidelityFigures?.tokens ?? 0,
    fullPerplexity: fidelityFigures?.fullPerplexity ?? null,
    emulatorPerplexity: fidelityFigures?.emulatorPerplexity ?? null,
    middleCosine: fidelityFigures?.middleCosine ?? null,
    emulatorBytes: emulatorFile.length,
    fullMiddleBytes: middleBytes,
    sizeRatio: emulatorFile.length / middleBytes,
  };
  const body: ManifestBody = {
    format: 'tandem-emulator-bundle',
    version: 1,
    baseModel: { id: modelId, contentHash: `sha256:${loaded.contentHash}`, numLayers: layout.numLayers },
    cut: { ...cut },
    keptLayers: layout.kept,
    emulatedLayers: emulatedLayerCount(layout),
    quantization: quantize === null ? null : { method: quantize, scheme: 'absmax-per-output-row', scaleSuffix: SCALE_SUFFIX },
    distillation,
    fidelity,
  };
  const sideFiles = new Map<string, Uint8Array>();
  for (const name of [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) {
    const bytes = await readIfExists(join(options.modelDir, name));
    if (bytes) sideFiles.set(name, bytes);
  }
  const { files, manifest } = encodeBundle({ rawConfig, edgeWeights: edge, emulatorWeights: kept, sideFiles }, body, emulatorFile);
  await writeBundleFiles(options.outDir, files);
  options.onEvent?.({ type: 'done', dir: join(options.outDir, MANIFEST_FILE), manifest });
  return manifest;
}

/** The fidelity report as lines of text, as `tandem emulate` prints it. */
export function describeFidelity(manifest: BundleManifest): string[] {
  const f = manifest.fidelity;
  const num = (v: number | null, digits = 2) => (v === null ? 'n/a' : v.toFixed(digits));
  const kib = (b: number) => `${(b / 1024).toFixed(1)} KiB`;
  return [
    `emulator of ${manifest.baseModel.id} (${manifest.baseModel.contentHash.slice(0, 19)}…): cut (${manifest.cut.bottom}, ${manifest.cut.top}), keeps middle blocks ${manifest.keptLayers.join(', ')} of [${manifest.cut.bottom}, ${manifest.baseModel.numLayers - manifest.cut.top})`,
    `  distillation     ${manifest.distillation ? `${manifest.distillation.steps} steps on ${manifest.distillation.data}, λ ${manifest.distillation.lambda}, final loss ${manifest.distillation.finalLoss.toFixed(4)} (LM ${manifest.distillation.finalLmLoss.toFixed(4)}, hidden ${manifest.distillation.finalKdLoss.toFixed(4)})` : 'none'}`,
    `  quantization     ${manifest.quantization ? `${manifest.quantization.method} (${manifest.quantization.scheme})` : 'none (float32)'}`,
    `  validation       ${f.data ?? 'none'}${f.data ? ` (${f.tokens} tokens)` : ''}`,
    `  perplexity       full model ${num(f.fullPerplexity)}, emulated model ${num(f.emulatorPerplexity)}`,
    `  middle cosine    ${num(f.middleCosine, 4)}`,
    `  size             emulator ${kib(f.emulatorBytes)} against the full middle's ${kib(f.fullMiddleBytes)} (${(100 * f.sizeRatio).toFixed(1)}%)`,
    `  checksum         ${manifest.checksum}`,
  ];
}
