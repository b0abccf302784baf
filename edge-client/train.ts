// Split training on the edge: download the edge part, open a session, hold the data, the
// adapter and the optimizer here, and run model/train's loop with the cloud as the middle.
// Checkpoints carry everything a resume needs (adapter, optimizer, data position,
// generators), so a resumed run takes exactly the steps the uninterrupted one would.
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import {
  BatchStream,
  Trainer,
  checkSameRun,
  createAdapter,
  createOptimizer,
  loadAdapter,
  prepareData,
  readDataset,
  readTrainingCheckpoint,
  saveAdapter,
  saveTrainingCheckpoint,
} from '../model/index.ts';
import type { Cut, MethodSpec, Optimizer, OptimizerKind, PeftAdapter, ScheduleKind, StepResult } from '../model/index.ts';
import { CODEC_NAMES } from '../protocol/index.ts';
import type { CodecName, CodecSpec } from '../protocol/index.ts';
import { loadEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import { evaluate } from './evaluate.ts';
import type { EvalResult } from './evaluate.ts';
import type { MiddleTraffic } from './remote-middle.ts';
import { connectCloud } from './session.ts';

export interface EdgeTrainOptions {
  /** The cloud node's base URL, e.g. http://127.0.0.1:8080. */
  cloud: string;
  key: string;
  /** PEM CA certificate(s) for an https:// cloud with a private CA. */
  ca?: string;
  /** A model id the cloud serves (GET /v1/models). */
  model: string;
  /** A .jsonl ({"text"}, {"prompt","completion"} or {"text","label"}) or plain-text file. */
  data: string;
  /** Defaults to the model's default cut. */
  cut?: Cut;
  /** PEFT methods on the edge's blocks; default LoRA r 8 on q_proj and v_proj. */
  methods?: MethodSpec[];
  codecForward?: CodecName | CodecSpec;
  codecBackward?: CodecName | CodecSpec;
  steps?: number;
  batchSize?: number;
  /** Micro-batches per step (each of batchSize rows); pipelined over the wire. */
  microbatches?: number;
  seqLen?: number;
  lr?: number;
  schedule?: ScheduleKind;
  warmupSteps?: number;
  optimizer?: OptimizerKind;
  weightDecay?: number;
  clipNorm?: number;
  seed?: number;
  valFraction?: number;
  /** Evaluate before and after training (validation loss, label accuracy). Default true. */
  evaluate?: boolean;
  /** Also evaluate every this many steps; 0 never. */
  evalEvery?: number;
  /** Where checkpoints go; an existing checkpoint there is resumed. */
  checkpointDir?: string;
  checkpointEvery?: number;
  /** Write the final adapter as a PEFT folder here. */
  out?: string;
  cacheDir?: string;
  requestTimeoutMs?: number;
  retries?: number;
  /** Progress; awaited, so a caller may pause training (tests restart the cloud here). */
  onEvent?: (event: TrainEvent) => void | Promise<void>;
}

export interface WireSummary {
  bytesSent: number;
  bytesReceived: number;
  requests: number;
  retries: number;
  reconnects: number;
  reattached: number;
  reopened: number;
  meanRttMs: number;
  /** Tensor-frame bytes per trained token (a token position of a training row), each way. */
  upBytesPerToken: number;
  downBytesPerToken: number;
  frames: MiddleTraffic;
}

export type TrainEvent =
  | { type: 'start'; model: string; contentHash: string; cut: Cut; codecs: { forward: string; backward: string }; trainableParameters: number; steps: number; startStep: number; downloadedBytes: number; cached: boolean; trainRows: number; validationRows: number }
  | { type: 'eval'; phase: 'before' | 'during' | 'after'; step: number; result: EvalResult }
  | { type: 'step'; step: number; steps: number; loss: number; lr: number; gradNorm: number; tokensPerSecond: number; stepMs: number; bytesSent: number; bytesReceived: number; rttMs: number }
  | { type: 'checkpoint'; step: number; dir: string };

export interface EdgeTrainResult {
  model: string;
  contentHash: string;
  cut: Cut;
  codecs: { forward: CodecSpec; backward: CodecSpec };
  methods: MethodSpec[];
  /** Step the run started from (0, or the checkpoint's). */
  startStep: number;
  steps: number;
  /** Loss of each step this run took, in order. */
  losses: number[];
  before?: EvalResult;
  after?: EvalResult;
  wire: WireSummary;
  trainableParameters: number;
  seconds: number;
  /** The adapter's tensors at the end, by PEFT key. */
  adapter: Map<string, { shape: number[]; data: Float32Array }>;
}

export const DEFAULT_METHODS: MethodSpec[] = [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'] }];

function codecSpec(c: CodecName | CodecSpec | undefined, field: string): CodecSpec {
  const spec = typeof c === 'string' ? { codec: c } : (c ?? { codec: 'f32' as const });
  if (!(CODEC_NAMES as readonly string[]).includes(spec.codec)) {
    throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `unknown codec ${JSON.stringify(spec.codec)}; choose one of ${CODEC_NAMES.join(', ')}`, { field });
  }
  return spec;
}

function positiveInt(v: number, field: string, min = 1): number {
  if (!Number.isInteger(v) || v < min) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `must be an integer ≥ ${min}, got ${v}`, { field });
  return v;
}

async function hasCheckpoint(dir: string | undefined): Promise<boolean> {
  if (!dir) return false;
  const s = await stat(dir).catch(() => undefined);
  if (!s?.isDirectory()) return false;
  return (await readdir(dir)).includes('trainer_state.json');
}

function snapshot(adapter: PeftAdapter): Map<string, { shape: number[]; data: Float32Array }> {
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, v] of adapter.trainableVariables()) out.set(name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) });
  return out;
}

/** Fine-tunes the adapter on the edge with the cloud running the middle of the model. */
export async function trainEdge(options: EdgeTrainOptions): Promise<EdgeTrainResult> {
  const t0 = performance.now();
  const steps = positiveInt(options.steps ?? 100, 'steps');
  const batchSize = positiveInt(options.batchSize ?? 8, 'batchSize');
  const microbatches = positiveInt(options.microbatches ?? 1, 'microbatches');
  const seqLen = positiveInt(options.seqLen ?? 128, 'seqLen', 2);
  const seed = options.seed ?? 0;
  const lr = options.lr ?? 1e-3;
  if (!(lr > 0)) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `must be > 0, got ${lr}`, { field: 'lr' });
  const forward = codecSpec(options.codecForward, 'codecForward');
  const backward = codecSpec(options.codecBackward, 'codecBackward');
  const methods = options.methods ?? DEFAULT_METHODS;
  const emit = async (e: TrainEvent) => options.onEvent?.(e);

  const client = await connectCloud(options.cloud, { key: options.key, requestTimeoutMs: options.requestTimeoutMs, retries: options.retries, ca: options.ca });
  let edge: Awaited<ReturnType<typeof loadEdgePart>> | undefined;
  let adapter: PeftAdapter | undefined;
  let trainer: Trainer | undefined;
  let optimizer: Optimizer | undefined;
  try {
    const info = (await client.models()).find((m) => m.id === options.model);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(options.model)}`, { field: 'model' });
    const cut = options.cut ?? info.defaultCut;
    const part = await client.downloadEdge(info.id, cut, options.cacheDir);
    edge = await loadEdgePart(part);
    const { model, tokenizer } = edge;
    const dataset = await readDataset(options.data);
    const prepared = prepareData(dataset, tokenizer, { seqLen, valFraction: options.valFraction ?? 0.1, seed });

    const run = { model: info.id, contentHash: edge.contentHash, cut, methods, data: options.data, seed, seqLen, batchSize, microbatches, steps, lr };
    const resume = (await hasCheckpoint(options.checkpointDir)) ? await readTrainingCheckpoint(options.checkpointDir as string) : undefined;
    if (resume) {
      try {
        checkSameRun(resume.state.run, run, options.checkpointDir as string);
      } catch (cause) {
        throw new EdgeError('TANDEM_EDGE_CHECKPOINT_MISMATCH', (cause as Error).message, { where: options.checkpointDir, cause });
      }
    }
    adapter = resume ? await loadAdapter(model, resume.adapterDir, { seed }) : createAdapter(model, methods, { seed });
    if (resume?.state.adapterRandom) adapter.setRandomState(resume.state.adapterRandom);
    const opt = createOptimizer(options.optimizer ?? 'adamw', { weightDecay: options.weightDecay ?? 0 });
    optimizer = opt;
    if (resume) opt.load(resume.optimizer, adapter.trainableVariables());
    const stream = new BatchStream(prepared.train, batchSize, seed, resume?.state.data);
    const startStep = resume?.state.step ?? 0;

    const session = await client.openSession({ model: { id: info.id, contentHash: edge.contentHash }, cut, codecs: { forward: [forward], backward: [backward] }, methods: methods.map((m) => m.method) });
    session.completedStep = startStep;
    const middle = session.middle();
    trainer = new Trainer({
      model,
      adapter,
      optimizer: opt,
      schedule: { kind: options.schedule ?? 'constant', lr, warmupSteps: options.warmupSteps ?? 0, totalSteps: steps },
      cut,
      middle,
      clipNorm: options.clipNorm ?? 0,
    });
    middle.needsBackward = trainer.needsMiddleBackward;
    const trainableParameters = [...adapter.trainableVariables().values()].reduce((n, v) => n + v.size, 0);
    await emit({
      type: 'start', model: info.id, contentHash: edge.contentHash, cut, codecs: { forward: forward.codec, backward: backward.codec }, trainableParameters, steps, startStep,
      downloadedBytes: part.downloadedBytes, cached: part.cached, trainRows: prepared.train.length, validationRows: prepared.validation.length,
    });

    const doEval = options.evaluate ?? true;
    const evalOptions = { batchSize, seqLen };
    const before = doEval && startStep === 0 ? await evaluate(trainer, prepared, tokenizer, evalOptions) : undefined;
    if (before) await emit({ type: 'eval', phase: 'before', step: 0, result: before });

    const losses: number[] = [];
    let trainedTokens = 0;
    const saveCheckpoint = async (): Promise<void> => {
      if (!options.checkpointDir || !trainer || !adapter) return;
      const a = adapter;
      await saveTrainingCheckpoint(
        options.checkpointDir,
        { state: { step: trainer.step, optimizer: { kind: opt.kind, step: opt.stepCount }, data: stream.state(), adapterRandom: a.randomState(), run }, optimizer: opt.state() },
        (dir) => saveAdapter(a, dir, { baseModel: info.id }),
      );
      await emit({ type: 'checkpoint', step: trainer.step, dir: options.checkpointDir });
    };
    while (trainer.step < steps) {
      const ts = performance.now();
      const batch = Array.from({ length: microbatches }, () => stream.next());
      const result: StepResult = await trainer.trainStep(batch);
      session.completedStep = trainer.step;
      const stepMs = performance.now() - ts;
      const tokens = batch.reduce((n, b) => n + b.ids.length * b.ids[0].length, 0);
      trainedTokens += tokens;
      losses.push(result.loss);
      const s = client.stats;
      await emit({
        type: 'step', step: result.step, steps, loss: result.loss, lr: result.lr, gradNorm: result.gradNorm, tokensPerSecond: tokens / (stepMs / 1000), stepMs,
        bytesSent: s.bytesSent, bytesReceived: s.bytesReceived, rttMs: s.lastRttMs,
      });
      if (options.evalEvery && trainer.step % options.evalEvery === 0 && trainer.step < steps) {
        await emit({ type: 'eval', phase: 'during', step: trainer.step, result: await evaluate(trainer, prepared, tokenizer, evalOptions) });
      }
      if (options.checkpointEvery && trainer.step % options.checkpointEvery === 0 && trainer.step < steps) await saveCheckpoint();
    }
    await saveCheckpoint();
    const after = doEval ? await evaluate(trainer, prepared, tokenizer, evalOptions) : undefined;
    if (after) await emit({ type: 'eval', phase: 'after', step: trainer.step, result: after });
    if (options.out) await saveAdapter(adapter, options.out, { baseModel: info.id });
    await session.close('completed');
    const s = client.stats;
    const frames = { ...middle.traffic };
    return {
      model: info.id,
      contentHash: edge.contentHash,
      cut,
      codecs: { forward: session.welcome.codecs.forward, backward: session.welcome.codecs.backward },
      methods,
      startStep,
      steps: trainer.step,
      losses,
      before,
      after,
      wire: {
        bytesSent: s.bytesSent, bytesReceived: s.bytesReceived, requests: s.requests, retries: s.retries, reconnects: s.reconnects,
        reattached: session.reattached, reopened: session.reopened, meanRttMs: s.meanRttMs,
        upBytesPerToken: trainedTokens > 0 ? (frames.forwardUpBytes + frames.backwardUpBytes) / trainedTokens : 0,
        downBytesPerToken: trainedTokens > 0 ? (frames.forwardDownBytes + frames.backwardDownBytes) / trainedTokens : 0,
        frames,
      },
      trainableParameters,
      seconds: (performance.now() - t0) / 1000,
      adapter: snapshot(adapter),
    };
  } finally {
    trainer?.dispose();
    optimizer?.dispose();
    adapter?.dispose();
    edge?.model.dispose();
    client.close();
  }
}

/** `tandem edge export`: the adapter of a training checkpoint as a PEFT folder. */
export async function exportAdapter(checkpointDir: string, outDir: string): Promise<string[]> {
  const { cp, mkdir } = await import('node:fs/promises');
  const ckpt = await readTrainingCheckpoint(checkpointDir);
  await mkdir(outDir, { recursive: true });
  const files = await readdir(ckpt.adapterDir);
  for (const f of files) await cp(join(ckpt.adapterDir, f), join(outDir, f));
  return files;
}
