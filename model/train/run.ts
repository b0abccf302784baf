// Local training, evaluation and export of a Hugging Face model folder with a PEFT adapter:
// what `tandem train`, `tandem eval` and `tandem export` run. The CLI only parses flags.
import { cp, mkdir, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { initBackend } from '../backend.ts';
import { CONFIG_FILE, TOKENIZER_FILE, loadModelFolder, readModelConfig, saveModelFolder } from '../checkpoint.ts';
import { ModelError } from '../errors.ts';
import { LlamaModel } from '../llama/llama.ts';
import { loadAdapter, saveAdapter } from '../peft/index.ts';
import type { MethodSpec, PeftAdapter } from '../peft/index.ts';
import { TOKENIZER_CONFIG_FILE, checkTokenizerFits, loadTokenizer } from '../tokenizer.ts';
import type { Tokenizer } from '../tokenizer.ts';
import { readTrainingCheckpoint } from './checkpoint.ts';
import { prepareData, readDataset } from './data.ts';
import type { WeightArrays } from '../engine/llama-graphs.ts';
import { openEngine } from './engine-choice.ts';
import type { OpenedEngine } from './engine-choice.ts';
import { evaluateClassification, evaluateRows, localScorer, ortScorer } from './evaluate.ts';
import { mergedWeightArrays } from './merged-weights.ts';
import type { Cut } from './loop.ts';
import { checkInteger, checkRecipeFitsModel } from './recipe.ts';
import type { TrainRecipe } from './recipe.ts';
import { checkRun, checkpointFolder, runTraining } from './training-run.ts';
import type { RunSettings, TrainEventHandler, TrainingResult } from './training-run.ts';

export const CHECKPOINT_DIR = 'checkpoint';
export const ADAPTER_DIR = 'adapter';

export interface TrainLocalOptions extends TrainRecipe, Omit<RunSettings, 'adapterOut' | 'onEvent'> {
  modelDir: string;
  dataFile: string;
  /** Receives `checkpoint/` and, when every step is done, `adapter/`. */
  outDir: string;
  /** The PEFT methods to train (createAdapter specs). Ignored on resume: the checkpoint's adapter is used. */
  methods: MethodSpec[];
  /** Where the model is cut; local whole-model training when absent. */
  cut?: Cut;
  /** Continue from `outDir/checkpoint`. */
  resume?: boolean;
  backend?: string;
  /** The engine (see TrainingSpec.engine): a name or 'auto'; absent: TANDEM_ENGINE when set, else tfjs. */
  engine?: string;
  /** Receives the backend and engine choice lines. */
  log?: (line: string) => void;
}

export type TrainSummary = TrainingResult & { checkpointDir: string };

async function loadModel(modelDir: string): Promise<{ model: LlamaModel; tokenizer: Tokenizer; contentHash: string; weights: WeightArrays }> {
  const loaded = await loadModelFolder(modelDir);
  const tokenizer = await loadTokenizer(modelDir);
  checkTokenizerFits(tokenizer, loaded.config.vocabSize);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  return { model, tokenizer, contentHash: loaded.contentHash, weights: loaded.weights };
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Trains a PEFT adapter on a model folder with data from a file, in this process: the one
 * training run with the model's own middle. Writes `outDir/checkpoint` and, when all steps
 * are done, the adapter as a PEFT folder in `outDir/adapter`. With `resume`, continues from
 * the checkpoint exactly: the result is bit for bit that of an uninterrupted run.
 */
export async function trainLocal(options: TrainLocalOptions, onEvent?: TrainEventHandler): Promise<TrainSummary> {
  const { modelDir, dataFile, outDir, methods, cut, resume, backend, engine: engineName, log, evalEvery, evaluate, saveEvery, stopAfter, ...recipe } = options;
  checkRun(recipe, options);
  // config.json alone, before the backend and the weights: the recipe must fit the model (runTraining checks again with the adapter's virtual tokens).
  checkRecipeFitsModel(recipe, await readModelConfig(modelDir));
  await initBackend({ backend, log });
  const { model, tokenizer, contentHash, weights } = await loadModel(modelDir);
  const checkpointDir = join(outDir, CHECKPOINT_DIR);
  let opened: OpenedEngine | undefined;
  try {
    opened = await openEngine(model.config, () => weights, engineName, log);
    const result = await runTraining({
      model, tokenizer, modelHash: contentHash, dataFile, recipe, cut, methods, store: checkpointFolder(checkpointDir), resume: resume ?? false, baseModel: modelDir,
      evalEvery, evaluate, saveEvery, stopAfter, onEvent, adapterOut: join(outDir, ADAPTER_DIR), engine: opened.engine ?? false,
    });
    return { ...result, checkpointDir };
  } finally {
    await opened?.close();
    model.dispose();
  }
}

export interface EvaluateLocalOptions {
  modelDir: string;
  adapterDir?: string;
  dataFile: string;
  seqLen: number;
  batchSize: number;
  backend?: string;
  /** As TrainLocalOptions.engine. On ONNX Runtime an adapter is merged into the weights; one that cannot merge is scored on tfjs. */
  engine?: string;
  log?: (line: string) => void;
}

export interface EvaluationReport {
  loss: number;
  perplexity: number;
  tokens: number;
  /** Label data only: accuracy of picking the most likely label word. */
  accuracy?: number;
  examples: number;
}

/** Loss and perplexity (and accuracy for {"text","label"} data) of a model, with an adapter when given, over a whole data file. */
export async function evaluateLocal(options: EvaluateLocalOptions): Promise<EvaluationReport> {
  checkInteger(options.seqLen, 'seqLen', 2);
  checkInteger(options.batchSize, 'batchSize');
  checkRecipeFitsModel(options, await readModelConfig(options.modelDir));
  await initBackend({ backend: options.backend, log: options.log });
  const { model, tokenizer, weights } = await loadModel(options.modelDir);
  let adapter: PeftAdapter | undefined;
  let opened: OpenedEngine | undefined;
  try {
    adapter = options.adapterDir ? await loadAdapter(model, options.adapterDir) : undefined;
    if (adapter) checkRecipeFitsModel(options, model.config, adapter.numVirtualTokens);
    const dataset = await readDataset(options.dataFile);
    const data = prepareData(dataset, tokenizer, { seqLen: options.seqLen, valFraction: 0, seed: 0, pack: false });
    // Merged only once ONNX Runtime is chosen: tfjs scores through the adapter's hooks, unmerged.
    let unmergeable: string | undefined;
    const engineWeights = (): WeightArrays => {
      const merged = adapter ? mergedWeightArrays(model, adapter) : { weights };
      unmergeable = merged.reason;
      return merged.weights ?? weights;
    };
    opened = await openEngine(model.config, engineWeights, options.engine, options.log);
    if (opened.engine && unmergeable !== undefined) options.log?.(`eval on tfjs: the adapter cannot merge into the weights (${unmergeable})`);
    const scorer = opened.engine && unmergeable === undefined ? ortScorer(opened.engine) : localScorer(model, adapter);
    const lm = await evaluateRows(scorer, data.train, options.batchSize);
    const records = dataset.examples.flatMap((e) => (e.kind === 'label' ? [{ text: e.text, label: e.label }] : []));
    const labels = data.classification?.labels;
    const accuracy = labels ? (await evaluateClassification(scorer, tokenizer, records, labels, options.seqLen)).accuracy : undefined;
    return { ...lm, examples: dataset.examples.length, ...(accuracy === undefined ? {} : { accuracy }) };
  } finally {
    await opened?.close();
    adapter?.dispose();
    model.dispose();
  }
}

export interface ExportOptions {
  /** A PEFT adapter folder, or */
  adapterDir?: string;
  /** a training checkpoint, whose adapter is exported. */
  checkpointDir?: string;
  outDir: string;
  /** The base model folder: the adapter is loaded onto it (checked) and written again. Needed for `merged`. */
  modelDir?: string;
  /** Fold the adapter into the weights and write a Hugging Face model folder; otherwise the PEFT folder. */
  merged?: boolean;
  backend?: string;
}

export interface ExportResult {
  outDir: string;
  kind: 'peft' | 'merged';
  files: string[];
}

/**
 * Writes an adapter (a PEFT folder or a checkpoint's) as a PEFT folder, or the model with the
 * adapter merged as a Hugging Face folder. Without a model folder the PEFT files are copied.
 */
export async function exportAdapter(options: ExportOptions): Promise<ExportResult> {
  if ((options.adapterDir === undefined) === (options.checkpointDir === undefined)) {
    throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', 'export needs one of an adapter folder and a checkpoint', { field: 'adapterDir' });
  }
  if (options.merged && options.modelDir === undefined) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', 'a merged export needs the base model folder', { field: 'modelDir' });
  const adapterDir = options.adapterDir ?? (await readTrainingCheckpoint(options.checkpointDir as string)).adapterDir;
  const { outDir } = options;
  if (options.modelDir === undefined) {
    await mkdir(outDir, { recursive: true });
    const files = (await readdir(adapterDir)).sort();
    for (const f of files) await cp(join(adapterDir, f), join(outDir, f));
    return { outDir, kind: 'peft', files };
  }
  const { modelDir } = options;
  await initBackend({ backend: options.backend });
  const { model } = await loadModel(modelDir);
  let adapter: PeftAdapter | undefined;
  try {
    adapter = await loadAdapter(model, adapterDir);
    if (!options.merged) {
      await saveAdapter(adapter, outDir, { baseModel: modelDir });
      return { outDir, kind: 'peft', files: (await readdir(outDir)).sort() };
    }
    adapter.merge();
    const rawConfig = JSON.parse(await readFile(join(modelDir, CONFIG_FILE), 'utf8')) as Record<string, unknown>;
    const weights = new Map([...model.weights].map(([name, v]) => [name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) }]));
    const copyFiles: string[] = [];
    for (const f of [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) if (await exists(join(modelDir, f))) copyFiles.push(join(modelDir, f));
    await saveModelFolder(outDir, rawConfig, weights, { copyFiles });
    return { outDir, kind: 'merged', files: (await readdir(outDir)).sort() };
  } finally {
    adapter?.dispose();
    model.dispose();
  }
}
