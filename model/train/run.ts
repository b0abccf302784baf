// Local training, evaluation and export of a Hugging Face model folder with a PEFT adapter:
// what `tandem train`, `tandem eval` and `tandem export` run. The CLI only parses flags.
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { initBackend } from '../backend.ts';
import { CONFIG_FILE, TOKENIZER_FILE, loadModelFolder, saveModelFolder } from '../checkpoint.ts';
import { ModelError } from '../errors.ts';
import { LlamaModel } from '../llama/llama.ts';
import { createAdapter, loadAdapter, saveAdapter } from '../peft/index.ts';
import type { MethodSpec, PeftAdapter } from '../peft/index.ts';
import { Rng } from '../random.ts';
import { TOKENIZER_CONFIG_FILE, loadTokenizer } from '../tokenizer.ts';
import type { Tokenizer } from '../tokenizer.ts';
import { checkSameRun, readTrainingCheckpoint, saveTrainingCheckpoint } from './checkpoint.ts';
import { BatchStream, prepareData, readDataset } from './data.ts';
import type { PreparedData } from './data.ts';
import { evaluateClassification, evaluateRows, localScorer } from './evaluate.ts';
import type { Scorer } from './evaluate.ts';
import { Trainer } from './loop.ts';
import type { Cut } from './loop.ts';
import { createOptimizer } from './optimizer.ts';
import type { OptimizerKind } from './optimizer.ts';
import type { ScheduleKind } from './schedule.ts';

export const CHECKPOINT_DIR = 'checkpoint';
export const ADAPTER_DIR = 'adapter';

/** Everything that decides the numbers a run produces. */
export interface TrainRecipe {
  /** Optimizer steps. */
  steps: number;
  /** Rows per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step. */
  gradAccum: number;
  seqLen: number;
  lr: number;
  warmup: number;
  schedule: ScheduleKind;
  optimizer: OptimizerKind;
  weightDecay: number;
  /** SGD momentum (ignored by AdamW). */
  momentum: number;
  /** Global gradient-norm limit; 0 turns clipping off. */
  clip: number;
  seed: number;
  valFraction: number;
  /** Pack short sequences into rows. */
  pack: boolean;
  /** Where the model is cut; local whole-model training when absent. */
  cut?: Cut;
}

export const DEFAULT_RECIPE: Omit<TrainRecipe, 'steps'> = {
  batchSize: 8,
  gradAccum: 1,
  seqLen: 256,
  lr: 2e-4,
  warmup: 0,
  schedule: 'cosine',
  optimizer: 'adamw',
  weightDecay: 0.01,
  momentum: 0.9,
  clip: 1,
  seed: 0,
  valFraction: 0.1,
  pack: true,
};

export interface TrainLocalOptions extends TrainRecipe {
  modelDir: string;
  dataFile: string;
  outDir: string;
  /** The PEFT methods to train (createAdapter specs). Ignored on resume: the checkpoint's adapter is used. */
  methods: MethodSpec[];
  /** Validate every this many steps (0: at the end only). */
  evalEvery: number;
  /** Checkpoint every this many steps (0: at the end only). */
  saveEvery: number;
  /** Continue from `outDir/checkpoint`. */
  resume?: boolean;
  /** Stop (with a checkpoint) once this many steps are done, before `steps`: a run in parts. */
  stopAfter?: number;
  backend?: string;
}

export type TrainEvent =
  | { type: 'start'; backend: string; step: number; totalSteps: number; trainRows: number; validationRows: number; trainableParameters: number; resumed: boolean }
  | { type: 'step'; step: number; totalSteps: number; loss: number; lr: number; gradNorm: number; tokensPerSecond: number; elapsedSeconds: number; etaSeconds: number }
  | { type: 'eval'; step: number; loss: number; perplexity: number; accuracy?: number }
  | { type: 'checkpoint'; step: number; dir: string }
  | { type: 'done'; step: number; adapterDir?: string; checkpointDir: string };

export interface TrainSummary {
  step: number;
  finished: boolean;
  lastLoss: number;
  validation?: { loss: number; perplexity: number; accuracy?: number };
  adapterDir?: string;
  checkpointDir: string;
}

function positiveInt(value: number, field: string, min = 1): void {
  if (!Number.isInteger(value) || value < min) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${field} must be an integer ≥ ${min}, got ${value}`, { field });
}

function nonNegative(value: number, field: string): void {
  if (!(Number.isFinite(value) && value >= 0)) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${field} must be a number ≥ 0, got ${value}`, { field });
}

export function checkRecipe(r: TrainRecipe): void {
  positiveInt(r.steps, 'steps');
  positiveInt(r.batchSize, 'batch_size');
  positiveInt(r.gradAccum, 'grad_accum');
  positiveInt(r.seqLen, 'seq_len', 2);
  positiveInt(r.warmup, 'warmup', 0);
  if (!(Number.isFinite(r.lr) && r.lr > 0)) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `lr must be a number > 0, got ${r.lr}`, { field: 'lr' });
  nonNegative(r.weightDecay, 'weight_decay');
  nonNegative(r.momentum, 'momentum');
  nonNegative(r.clip, 'clip');
  if (!Number.isInteger(r.seed)) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `seed must be an integer, got ${r.seed}`, { field: 'seed' });
}

async function loadModel(modelDir: string): Promise<{ model: LlamaModel; tokenizer: Tokenizer; contentHash: string }> {
  const loaded = await loadModelFolder(modelDir);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const tokenizer = await loadTokenizer(modelDir);
  return { model, tokenizer, contentHash: loaded.contentHash };
}

async function fileHash(file: string): Promise<string> {
  return createHash('sha256')
    .update(await readFile(file))
    .digest('hex');
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

async function validate(scorer: Scorer, data: PreparedData, tokenizer: Tokenizer, recipe: TrainRecipe): Promise<{ loss: number; perplexity: number; accuracy?: number } | undefined> {
  if (data.validation.length === 0) return undefined;
  const lm = await evaluateRows(scorer, data.validation, recipe.batchSize);
  const c = data.classification;
  const accuracy = c && c.validation.length > 0 ? (await evaluateClassification(scorer, tokenizer, c.validation, c.labels, recipe.seqLen)).accuracy : undefined;
  return { loss: lm.loss, perplexity: lm.perplexity, ...(accuracy === undefined ? {} : { accuracy }) };
}

/**
 * Trains a PEFT adapter on a model folder with data from a file, in this process. Writes
 * `outDir/checkpoint` (every saveEvery steps and at the end) and, when all steps are done,
 * the adapter as a PEFT folder in `outDir/adapter`. With `resume`, continues from the
 * checkpoint exactly: the result is bit for bit that of an uninterrupted run.
 */
export async function trainLocal(options: TrainLocalOptions, onEvent: (event: TrainEvent) => void = () => undefined): Promise<TrainSummary> {
  checkRecipe(options);
  positiveInt(options.evalEvery, 'eval_every', 0);
  positiveInt(options.saveEvery, 'save_every', 0);
  const backend = await initBackend({ backend: options.backend });
  const checkpointDir = join(options.outDir, CHECKPOINT_DIR);
  const adapterDir = join(options.outDir, ADAPTER_DIR);
  if (!options.resume && (await exists(checkpointDir))) {
    throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${checkpointDir} already holds a checkpoint; pass --resume to continue it or choose another --out`, { field: 'out' });
  }
  const { model, tokenizer, contentHash } = await loadModel(options.modelDir);
  const seeds = new Rng(options.seed);
  const splitSeed = seeds.nextU32();
  const streamSeed = seeds.nextU32();
  const adapterSeed = seeds.nextU32();
  const data = prepareData(await readDataset(options.dataFile), tokenizer, { seqLen: options.seqLen, valFraction: options.valFraction, seed: splitSeed, pack: options.pack });
  const { evalEvery, saveEvery, modelDir, dataFile, outDir: _o, resume, stopAfter, backend: _b, methods, ...recipe } = options;
  // What a checkpoint must agree with to be resumed by this run.
  const run: Record<string, unknown> = { model: contentHash, data: await fileHash(dataFile), recipe, methods };
  let adapter: PeftAdapter | undefined;
  let trainer: Trainer | undefined;
  try {
    let stream: BatchStream;
    const optimizer = createOptimizer(options.optimizer, { weightDecay: options.weightDecay, momentum: options.momentum });
    if (resume) {
      const ckpt = await readTrainingCheckpoint(checkpointDir);
      const { methods: savedMethods, ...saved } = ckpt.state.run;
      const { methods: _n, ...current } = run;
      checkSameRun(saved, current, checkpointDir);
      run.methods = savedMethods;
      adapter = await loadAdapter(model, ckpt.adapterDir, { seed: adapterSeed });
      if (ckpt.state.adapterRandom) adapter.setRandomState(ckpt.state.adapterRandom);
      optimizer.load(ckpt.optimizer, adapter.trainableVariables());
      stream = new BatchStream(data.train, options.batchSize, streamSeed, ckpt.state.data);
    } else {
      adapter = createAdapter(model, methods, { seed: adapterSeed });
      stream = new BatchStream(data.train, options.batchSize, streamSeed);
    }
    const schedule = { kind: options.schedule, lr: options.lr, warmupSteps: options.warmup, totalSteps: options.steps };
    trainer = new Trainer({ model, adapter, optimizer, schedule, cut: options.cut, clipNorm: options.clip });
    const trainableParameters = [...adapter.trainableVariables().values()].reduce((n, v) => n + v.size, 0);
    const startStep = trainer.step;
    onEvent({ type: 'start', backend: backend.name, step: startStep, totalSteps: options.steps, trainRows: data.train.length, validationRows: data.validation.length, trainableParameters, resumed: !!resume });
    const stopAt = Math.min(options.steps, stopAfter ?? options.steps);
    const began = performance.now();
    const tokensPerStep = options.batchSize * options.gradAccum * options.seqLen;
    let lastLoss = NaN;
    let validation: TrainSummary['validation'];
    const a = adapter;
    const saveCheckpoint = async (t: Trainer) => {
      await saveTrainingCheckpoint(
        checkpointDir,
        { state: { step: t.step, optimizer: { kind: t.optimizer.kind, step: t.optimizer.stepCount }, data: stream.state(), adapterRandom: a.randomState(), run }, optimizer: t.optimizer.state() },
        (dir) => saveAdapter(a, dir, { baseModel: modelDir }),
      );
      onEvent({ type: 'checkpoint', step: t.step, dir: checkpointDir });
    };
    if (evalEvery > 0 && startStep === 0) {
      // The baseline, so the first report says how far training moved validation.
      validation = await validate(trainer, data, tokenizer, options);
      if (validation) onEvent({ type: 'eval', step: 0, ...validation });
    }
    while (trainer.step < stopAt) {
      const microbatches = Array.from({ length: options.gradAccum }, () => stream.next());
      const r = await trainer.trainStep(microbatches);
      lastLoss = r.loss;
      const elapsed = (performance.now() - began) / 1000;
      const done = r.step - startStep;
      onEvent({
        type: 'step',
        step: r.step,
        totalSteps: options.steps,
        loss: r.loss,
        lr: r.lr,
        gradNorm: r.gradNorm,
        tokensPerSecond: (done * tokensPerStep) / Math.max(elapsed, 1e-9),
        elapsedSeconds: elapsed,
        etaSeconds: (elapsed / done) * (options.steps - r.step),
      });
      if ((evalEvery > 0 && r.step % evalEvery === 0) || r.step === options.steps) {
        validation = await validate(trainer, data, tokenizer, options);
        if (validation) onEvent({ type: 'eval', step: r.step, ...validation });
      }
      if ((saveEvery > 0 && r.step % saveEvery === 0) || r.step === stopAt) await saveCheckpoint(trainer);
    }
    const finished = trainer.step >= options.steps;
    if (finished) await saveAdapter(adapter, adapterDir, { baseModel: modelDir });
    onEvent({ type: 'done', step: trainer.step, checkpointDir, ...(finished ? { adapterDir } : {}) });
    return { step: trainer.step, finished, lastLoss, validation, checkpointDir, ...(finished ? { adapterDir } : {}) };
  } finally {
    trainer?.optimizer.dispose();
    trainer?.dispose();
    adapter?.dispose();
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
  positiveInt(options.seqLen, 'seq_len', 2);
  positiveInt(options.batchSize, 'batch_size');
  await initBackend({ backend: options.backend });
  const { model, tokenizer } = await loadModel(options.modelDir);
  let adapter: PeftAdapter | undefined;
  try {
    adapter = options.adapterDir ? await loadAdapter(model, options.adapterDir) : undefined;
    const dataset = await readDataset(options.dataFile);
    const data = prepareData(dataset, tokenizer, { seqLen: options.seqLen, valFraction: 0, seed: 0, pack: false });
    const scorer = localScorer(model, adapter);
    const lm = await evaluateRows(scorer, data.train, options.batchSize);
    const records = dataset.examples.flatMap((e) => (e.kind === 'label' ? [{ text: e.text, label: e.label }] : []));
    const labels = data.classification?.labels;
    const accuracy = labels ? (await evaluateClassification(scorer, tokenizer, records, labels, options.seqLen)).accuracy : undefined;
    return { ...lm, examples: dataset.examples.length, ...(accuracy === undefined ? {} : { accuracy }) };
  } finally {
    adapter?.dispose();
    model.dispose();
  }
}

export interface ExportOptions {
  modelDir: string;
  adapterDir: string;
  outDir: string;
  /** Fold the adapter into the weights and write a Hugging Face model folder; otherwise the PEFT folder. */
  merged?: boolean;
  backend?: string;
}

/** Writes the adapter as a PEFT folder, or the model with the adapter merged as a Hugging Face folder. */
export async function exportAdapter(options: ExportOptions): Promise<{ outDir: string; kind: 'peft' | 'merged' }> {
  await initBackend({ backend: options.backend });
  const { model } = await loadModel(options.modelDir);
  let adapter: PeftAdapter | undefined;
  try {
    adapter = await loadAdapter(model, options.adapterDir);
    if (!options.merged) {
      await saveAdapter(adapter, options.outDir, { baseModel: options.modelDir });
      return { outDir: options.outDir, kind: 'peft' };
    }
    adapter.merge();
    const rawConfig = JSON.parse(await readFile(join(options.modelDir, CONFIG_FILE), 'utf8')) as Record<string, unknown>;
    const weights = new Map([...model.weights].map(([name, v]) => [name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) }]));
    const copyFiles: string[] = [];
    for (const f of [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) if (await exists(join(options.modelDir, f))) copyFiles.push(join(options.modelDir, f));
    await saveModelFolder(options.outDir, rawConfig, weights, { copyFiles });
    return { outDir: options.outDir, kind: 'merged' };
  } finally {
    adapter?.dispose();
    model.dispose();
  }
}
