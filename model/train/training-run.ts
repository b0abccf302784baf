// The one training run. Local training, offsite training against an emulator and split
// training against the cloud all call it; they differ only in the middle (a LocalMiddle over
// the model's own blocks, or one that edge-client provides over the wire) and in where
// checkpoints go. Resume, checkpoints, evaluation and progress events live here and nowhere
// else, so a resumed run takes exactly the steps the uninterrupted one would.
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { createAdapter, loadAdapter, saveAdapter } from '../peft/index.ts';
import type { MethodSpec, PeftAdapter } from '../peft/index.ts';
import { Rng } from '../random.ts';
import { TRAINER_STATE_FILE, checkSameRun, readTrainingCheckpoint, saveTrainingCheckpoint } from './checkpoint.ts';
import type { TrainerState, TrainingCheckpoint } from './checkpoint.ts';
import { BatchStream, prepareData, readDataset } from './data.ts';
import type { PreparedData, TextTokenizer } from './data.ts';
import { evaluateClassification, evaluateRows } from './evaluate.ts';
import type { Scorer } from './evaluate.ts';
import { openEngine, weightArraysOf } from './engine-choice.ts';
import type { EngineRequest } from './engine-choice.ts';
import { Trainer } from './loop.ts';
import type { Cut } from './loop.ts';
import type { Middle } from './middle.ts';
import { createOptimizer } from './optimizer.ts';
import type { Optimizer, OptimizerState } from './optimizer.ts';
import { checkInteger, checkRecipe, checkRecipeFitsModel } from './recipe.ts';
import type { TrainRecipe } from './recipe.ts';

/** Validation figures. */
export interface Evaluation {
  /** Mean negative log-likelihood per label token over the validation rows. */
  loss: number;
  perplexity: number;
  tokens: number;
  /** Label data only: fraction of validation records whose label scores highest. */
  accuracy?: number;
  /** Validation records (label data) or rows. */
  records: number;
}

/** Split mode only: what the edge downloaded and negotiated (trainEdge adds it to `start`). */
export interface RemoteStart {
  model: string;
  contentHash: string;
  codecs: { forward: string; backward: string };
  downloadedBytes: number;
  cached: boolean;
}

/** Split mode only: the connection's counters so far (trainEdge adds them to `step`). */
export interface WireProgress {
  bytesSent: number;
  bytesReceived: number;
  rttMs: number;
}

/** What a run reports as it goes, for every kind of run. */
export type TrainEvent =
  | { type: 'start'; backend: string; engine?: string; step: number; totalSteps: number; cut?: Cut; trainRows: number; validationRows: number; trainableParameters: number; resumed: boolean; remote?: RemoteStart }
  | { type: 'step'; step: number; totalSteps: number; loss: number; lr: number; gradNorm: number; tokens: number; tokensPerSecond: number; stepMs: number; elapsedSeconds: number; etaSeconds: number; wire?: WireProgress }
  | ({ type: 'eval'; phase: 'before' | 'during' | 'after'; step: number } & Evaluation)
  | { type: 'checkpoint'; step: number; dir: string }
  | { type: 'done'; step: number; finished: boolean; adapterDir?: string; checkpointDir?: string };

/** Progress handler; awaited, so a caller may pause training (tests restart the cloud there). */
export type TrainEventHandler = (event: TrainEvent) => unknown;

/** Where a run's checkpoints live. */
export interface CheckpointStore {
  /** Names the store in messages and events. */
  readonly dir: string;
  has(): Promise<boolean>;
  read(): Promise<TrainingCheckpoint>;
  write(checkpoint: { state: Omit<TrainerState, 'version'>; optimizer: OptimizerState }, writeAdapter: (adapterDir: string) => Promise<void>): Promise<void>;
}

/** A checkpoint folder on local disk, replaced atomically on each write. */
export function checkpointFolder(dir: string): CheckpointStore {
  return {
    dir,
    has: () => stat(join(dir, TRAINER_STATE_FILE)).then((s) => s.isFile(), () => false),
    read: () => readTrainingCheckpoint(dir),
    write: (checkpoint, writeAdapter) => saveTrainingCheckpoint(dir, checkpoint, writeAdapter),
  };
}

/** sha256 of a file's bytes: what a checkpoint records of its data. */
export async function fileHash(file: string): Promise<string> {
  return createHash('sha256').update(await readFile(file)).digest('hex');
}

/** How a run goes, beyond the numbers the recipe decides. */
export interface RunSettings {
  /** Also validate every this many steps (0: only before and after). */
  evalEvery?: number;
  /** Validate before the first step and after the last. Default true. */
  evaluate?: boolean;
  /** Checkpoint every this many steps (0: only when the run stops). */
  saveEvery?: number;
  /** Stop (with a checkpoint) once this many steps are done, before `recipe.steps`: a run in parts. */
  stopAfter?: number;
  /** Write the adapter as a PEFT folder here once every step is done. */
  adapterOut?: string;
  onEvent?: TrainEventHandler;
  /** Ends the run between steps: runSteps rejects with the signal's reason (a federated round that moved on). */
  signal?: AbortSignal;
  /**
   * The engine of the frozen work: an OrtLlama over the model's weights, an engine name
   * ('auto' for the best that starts), or absent for TANDEM_ENGINE when set, else tfjs alone.
   * Plain LoRA trains on ONNX Runtime; other methods stay on tfjs (the start event says which).
   */
  engine?: EngineRequest;
  /** Receives the engine choice line when this run picks the engine. */
  log?: (line: string) => void;
}

export interface TrainingSpec extends RunSettings {
  /** The model the edge holds: the whole model, an emulated one, or only the edge's blocks. */
  model: LlamaModel;
  tokenizer: TextTokenizer;
  /** What a checkpoint must have been written for: the model's content hash. */
  modelHash: string;
  /** A .jsonl ({"text"}, {"prompt","completion"} or {"text","label"}) or plain-text file. */
  dataFile: string;
  recipe: TrainRecipe;
  /** Where the model is cut; local whole-model training when absent. */
  cut?: Cut;
  /** The PEFT methods of a new adapter; on resume the checkpoint's adapter is used. */
  methods: MethodSpec[];
  /** Start from this PEFT adapter folder instead of a new adapter of `methods` (a federated round starts from the global adapter). */
  adapterDir?: string;
  /** The middle; a LocalMiddle over the model's own blocks when absent. */
  middle?: Middle;
  /** Checkpoints; none are written without it. */
  store?: CheckpointStore;
  /** true: continue the store's checkpoint; false: refuse a store that holds one; 'auto': continue one if there is one. */
  resume?: boolean | 'auto';
  /** `base_model_name_or_path` of the adapters written. */
  baseModel: string;
  /** NoPeek weight α of dCor(token embeddings, h_B) in the edge's loss (a privacy defense); off when absent. */
  noPeek?: number;
}

/** A run's state between steps: "N more steps from here" is runSteps on it. */
export interface RunState {
  adapter: PeftAdapter;
  optimizer: Optimizer;
  stream: BatchStream;
  data: PreparedData;
  /** What the store's checkpoints record and a resume must match. */
  identity: Record<string, unknown>;
  methods: MethodSpec[];
  resumed: boolean;
}

export interface TrainingResult {
  /** Step the run started from (0, or the checkpoint's). */
  startStep: number;
  /** Steps completed. */
  step: number;
  /** Whether every step of the recipe is done. */
  finished: boolean;
  /** Loss of each step this run took, in order. */
  losses: number[];
  before?: Evaluation;
  after?: Evaluation;
  methods: MethodSpec[];
  trainableParameters: number;
  /** The adapter's tensors at the end, by PEFT key. */
  adapter: Map<string, { shape: number[]; data: Float32Array }>;
  adapterDir?: string;
  checkpointDir?: string;
}

/** Seeds of the data split, the batch order and the adapter, drawn from the recipe's seed (the cloud's held middle adapter is initialised from the adapter's). */
export function seedsOf(seed: number): { split: number; stream: number; adapter: number } {
  const rng = new Rng(seed);
  return { split: rng.nextU32(), stream: rng.nextU32(), adapter: rng.nextU32() };
}

/** The adapter, optimizer and data position a run starts from: the store's checkpoint, or new ones. */
export async function openRun(spec: TrainingSpec): Promise<RunState> {
  const { recipe, store } = spec;
  // The recipe meets the model here: a row must fit its positions before anything is read.
  checkRecipeFitsModel(recipe, spec.model.config);
  const seeds = seedsOf(recipe.seed);
  const dataset = await readDataset(spec.dataFile);
  // The adapter comes before the rows, so that its virtual tokens are counted before the data is tokenized.
  const prepare = (adapter: PeftAdapter): PreparedData => {
    checkRecipeFitsModel(recipe, spec.model.config, adapter.numVirtualTokens);
    return prepareData(dataset, spec.tokenizer, { seqLen: recipe.seqLen, valFraction: recipe.valFraction, seed: seeds.split, pack: recipe.pack });
  };
  const identity: Record<string, unknown> = { model: spec.modelHash, data: await fileHash(spec.dataFile), recipe: { ...recipe, cut: spec.cut } };
  const held = store ? await store.has() : false;
  if (held && spec.resume === false) {
    throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${store?.dir} already holds a checkpoint; resume it or write to another folder`, { field: 'resume' });
  }
  const optimizer = createOptimizer(recipe.optimizer, { weightDecay: recipe.weightDecay, momentum: recipe.momentum });
  let adapter: PeftAdapter | undefined;
  if (!store || !(spec.resume === true || (spec.resume === 'auto' && held))) {
    try {
      adapter = spec.adapterDir === undefined ? createAdapter(spec.model, spec.methods, { seed: seeds.adapter }) : await loadAdapter(spec.model, spec.adapterDir, { seed: seeds.adapter });
      const data = prepare(adapter);
      return { adapter, optimizer, stream: new BatchStream(data.train, recipe.batchSize, seeds.stream), data, identity, methods: spec.methods, resumed: false };
    } catch (err) {
      adapter?.dispose();
      optimizer.dispose();
      throw err;
    }
  }
  try {
    const ckpt = await store.read();
    const { methods: saved, ...savedIdentity } = ckpt.state.run;
    checkSameRun(savedIdentity, identity, store.dir);
    adapter = await loadAdapter(spec.model, ckpt.adapterDir, { seed: seeds.adapter });
    const data = prepare(adapter);
    if (ckpt.state.adapterRandom) adapter.setRandomState(ckpt.state.adapterRandom);
    optimizer.load(ckpt.optimizer, adapter.trainableVariables());
    const methods = Array.isArray(saved) ? (saved as MethodSpec[]) : spec.methods;
    return { adapter, optimizer, stream: new BatchStream(data.train, recipe.batchSize, seeds.stream, ckpt.state.data), data, identity, methods, resumed: true };
  } catch (err) {
    adapter?.dispose();
    optimizer.dispose();
    throw err;
  }
}

async function validate(scorer: Scorer, data: PreparedData, tokenizer: TextTokenizer, recipe: TrainRecipe): Promise<Evaluation | undefined> {
  if (data.validation.length === 0) return undefined;
  const lm = await evaluateRows(scorer, data.validation, recipe.batchSize);
  const c = data.classification;
  if (!c || c.validation.length === 0) return { loss: lm.loss, perplexity: lm.perplexity, tokens: lm.tokens, records: data.validation.length };
  const cls = await evaluateClassification(scorer, tokenizer, c.validation, c.labels, recipe.seqLen);
  return { loss: lm.loss, perplexity: lm.perplexity, tokens: lm.tokens, accuracy: cls.accuracy, records: cls.count };
}

function snapshot(adapter: PeftAdapter): Map<string, { shape: number[]; data: Float32Array }> {
  return new Map([...adapter.trainableVariables()].map(([name, v]) => [name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) }]));
}

/**
 * Steps from a run's state until `recipe.steps` (or `stopAfter`) are done: validation before,
 * during and after, checkpoints to the store, and the adapter written when every step is done.
 * The state stays the caller's (federated rounds continue from it).
 */
export async function runSteps(state: RunState, spec: TrainingSpec): Promise<TrainingResult> {
  const { recipe, store } = spec;
  const evalEvery = spec.evalEvery ?? 0;
  const saveEvery = spec.saveEvery ?? 0;
  const emit = async (e: TrainEvent): Promise<void> => {
    await spec.onEvent?.(e);
  };
  const { adapter, optimizer, stream, data } = state;
  const schedule = { kind: recipe.schedule, lr: recipe.lr, warmupSteps: recipe.warmupSteps, totalSteps: recipe.steps };
  const opened = await openEngine(spec.model.config, () => weightArraysOf(spec.model), spec.engine, spec.log);
  let trainer: Trainer;
  try {
    trainer = new Trainer({ model: spec.model, adapter, optimizer, schedule, cut: spec.cut, middle: spec.middle, maxGradNorm: recipe.maxGradNorm, noPeek: spec.noPeek, engine: opened.engine });
  } catch (err) {
    await opened.close();
    throw err;
  }
  try {
    const startStep = trainer.step;
    const trainableParameters = [...adapter.trainableVariables().values()].reduce((n, v) => n + v.size, 0);
    await emit({
      type: 'start', backend: tf.getBackend(), engine: trainer.engineNote ?? `tfjs ${tf.getBackend()}`, step: startStep, totalSteps: recipe.steps, ...(spec.cut ? { cut: { ...spec.cut } } : {}),
      trainRows: data.train.length, validationRows: data.validation.length, trainableParameters, resumed: state.resumed,
    });
    const evaluate = async (phase: 'before' | 'during' | 'after'): Promise<Evaluation | undefined> => {
      const v = await validate(trainer, data, spec.tokenizer, recipe);
      if (v) await emit({ type: 'eval', phase, step: trainer.step, ...v });
      return v;
    };
    const saveCheckpoint = async (s: CheckpointStore): Promise<void> => {
      const run = { ...state.identity, methods: state.methods };
      const trainerState = { step: trainer.step, optimizer: { kind: optimizer.kind, step: optimizer.stepCount }, data: stream.state(), adapterRandom: adapter.randomState(), run };
      await s.write({ state: trainerState, optimizer: optimizer.state() }, (dir) => saveAdapter(adapter, dir, { baseModel: spec.baseModel }));
      await emit({ type: 'checkpoint', step: trainer.step, dir: s.dir });
    };
    const doEval = spec.evaluate ?? true;
    const before = doEval && startStep === 0 ? await evaluate('before') : undefined;
    let after: Evaluation | undefined;
    const stopAt = Math.min(recipe.steps, spec.stopAfter ?? recipe.steps);
    const losses: number[] = [];
    const began = performance.now();
    let tokensDone = 0;
    while (trainer.step < stopAt) {
      // A step on tfjs's wasm or cpu backend resolves its promises as microtasks: without a turn of
      // the event loop between steps no timer or socket of the process ran until the run ended
      // (a federated owner's heartbeats, then its round, were lost).
      await new Promise((resolve) => setImmediate(resolve));
      spec.signal?.throwIfAborted();
      const t0 = performance.now();
      const microbatches = Array.from({ length: recipe.gradientAccumulationSteps }, () => stream.next());
      const r = await trainer.trainStep(microbatches);
      const stepMs = performance.now() - t0;
      const tokens = microbatches.reduce((n, b) => n + b.ids.length * b.ids[0].length, 0);
      tokensDone += tokens;
      losses.push(r.loss);
      const elapsed = (performance.now() - began) / 1000;
      await emit({
        type: 'step', step: r.step, totalSteps: recipe.steps, loss: r.loss, lr: r.lr, gradNorm: r.gradNorm, tokens,
        tokensPerSecond: tokensDone / Math.max(elapsed, 1e-9), stepMs, elapsedSeconds: elapsed, etaSeconds: (elapsed / losses.length) * (recipe.steps - r.step),
      });
      if (doEval && r.step === recipe.steps) after = await evaluate('after');
      else if (evalEvery > 0 && r.step % evalEvery === 0) after = await evaluate('during');
      if (store && ((saveEvery > 0 && r.step % saveEvery === 0) || r.step === stopAt)) await saveCheckpoint(store);
    }
    const finished = trainer.step >= recipe.steps;
    const adapterDir = finished ? spec.adapterOut : undefined;
    if (adapterDir !== undefined) await saveAdapter(adapter, adapterDir, { baseModel: spec.baseModel });
    const where = { ...(adapterDir === undefined ? {} : { adapterDir }), ...(store ? { checkpointDir: store.dir } : {}) };
    await emit({ type: 'done', step: trainer.step, finished, ...where });
    return { startStep, step: trainer.step, finished, losses, before, after, methods: state.methods, trainableParameters, adapter: snapshot(adapter), ...where };
  } finally {
    trainer.dispose();
    await opened.close();
  }
}

/** Checks a recipe and the run settings; callers do it before loading or connecting anything. */
export function checkRun(recipe: TrainRecipe, settings: RunSettings): void {
  checkRecipe(recipe);
  checkInteger(settings.evalEvery ?? 0, 'evalEvery', 0);
  checkInteger(settings.saveEvery ?? 0, 'saveEvery', 0);
  if (settings.stopAfter !== undefined) checkInteger(settings.stopAfter, 'stopAfter', 1);
}

/** The whole run: open (resume or start), step, and free the adapter and optimizer. */
export async function runTraining(spec: TrainingSpec): Promise<TrainingResult> {
  checkRun(spec.recipe, spec);
  const state = await openRun(spec);
  try {
    return await runSteps(state, spec);
  } finally {
    state.optimizer.dispose();
    state.adapter.dispose();
  }
}
