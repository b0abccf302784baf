// One training step over micro-batches, structured as the cut: bottom (embedding and
// blocks [0, B)) and top (blocks [L-T, L), norm, head, loss) run here; the middle runs
// behind the Middle interface. Local whole-model training is the cut (0, L): the bottom
// is the embedding alone and the middle is empty, so there is no round trip.
import { tapedForward, tf } from '../backend.ts';
import type { TapedForward } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { Adapter } from '../peft/adapter.ts';
import { batchTensors, checkBatch } from './batch.ts';
import type { Batch, BatchScore } from './batch.ts';
import { clipGradNorm } from './clip.ts';
import { labelTokens, rowLogLikelihood, scoreLogits } from './evaluate.ts';
import type { Scorer } from './evaluate.ts';
import { noPeekGradient } from '../privacy/distance-correlation.ts';
import { gradientsOf, variablesReached } from './gradients.ts';
import { LocalMiddle, randomStateOf } from './middle.ts';
import type { Middle, MicrobatchKey, RandomState } from './middle.ts';
import type { Optimizer } from './optimizer.ts';
import type { BottomForward, LoraParams, OrtLlama } from '../engine/ort-llama.ts';
import { OrtMiddle } from '../engine/middle.ts';
import { loraParamsOf, ortLoraPlan, planTouches } from './ort-plan.ts';
import type { OrtLoraPlan } from './ort-plan.ts';
import { learningRate } from './schedule.ts';
import type { ScheduleOptions } from './schedule.ts';

/** B blocks in the bottom and T in the top; the middle is blocks [B, L-T). */
export interface Cut {
  bottom: number;
  top: number;
}

export interface TrainerOptions {
  model: LlamaModel;
  adapter: Adapter;
  optimizer: Optimizer;
  schedule: ScheduleOptions;
  /** Defaults to local whole-model training, { bottom: 0, top: L }. */
  cut?: Cut;
  /** Defaults to a LocalMiddle over the model's blocks [B, L-T) with the adapter's hooks. */
  middle?: Middle;
  /** Clip gradients to this global L2 norm; 0 or undefined turns clipping off. */
  maxGradNorm?: number;
  /** NoPeek: the weight α of dCor(token embeddings, h_B) added to the edge's loss; 0 or undefined turns it off. */
  noPeek?: number;
  /**
   * Send micro-batch i+1 forward before i finishes. Default: on for a remote middle, off
   * for a local one, where it gains nothing and would change the order of dropout draws.
   */
  pipeline?: boolean;
  /**
   * The frozen model on ONNX Runtime (its weights those of `model`). Plain LoRA then trains
   * there: the bottom, the top with the loss and, for a local middle without LoRA, the middle.
   * Any other adapter stays on tfjs; `engineNote` says which and why.
   */
  engine?: OrtLlama;
}

export interface StepResult {
  /** Optimizer steps completed, this one included. */
  step: number;
  /** Mean loss over the step's label tokens (all micro-batches together). */
  loss: number;
  /** Label tokens the loss was averaged over. */
  tokens: number;
  lr: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
}

function accumulate(into: Map<string, tf.Tensor>, name: string, g: tf.Tensor): void {
  const prev = into.get(name);
  if (!prev) {
    into.set(name, g);
    return;
  }
  into.set(name, tf.tidy(() => tf.add(prev, g)));
  prev.dispose();
  g.dispose();
}

interface OrtInFlight {
  labels: Int32Array;
  shape: [number, number];
  bottom: BottomForward;
  hM: Promise<tf.Tensor3D>;
}

function addLoraGrads(into: Map<string, tf.Tensor>, plan: OrtLoraPlan, grads: LoraParams): void {
  for (const [path, g] of grads) {
    const m = plan.modules.get(path);
    if (!m) continue;
    accumulate(into, m.a.key, tf.tensor(g.a, m.a.variable.shape));
    accumulate(into, m.b.key, tf.tensor(g.b, m.b.variable.shape));
  }
}

interface InFlight {
  ids: tf.Tensor2D;
  labels: tf.Tensor2D;
  /** The bottom's forward with its tape, when the bottom trains: its backward needs no recomputation. */
  bottomTape: TapedForward | undefined;
  hM: Promise<tf.Tensor3D>;
  /** NoPeek only: d(α·dCor)/dh_B of this micro-batch, added to g_B. */
  noPeekGrad?: tf.Tensor3D;
}

export class Trainer implements Scorer {
  readonly model: LlamaModel;
  readonly adapter: Adapter;
  readonly optimizer: Optimizer;
  readonly schedule: ScheduleOptions;
  readonly cut: Cut;
  readonly middle: Middle;
  readonly maxGradNorm: number;
  readonly noPeek: number;
  private readonly ownsMiddle: boolean;
  private readonly pipeline: boolean;
  private readonly random: RandomState | undefined;
  private readonly trainable: Map<string, tf.Variable>;
  private readonly bottomVars: string[];
  private readonly topVars: string[];
  private readonly ort: { engine: OrtLlama; plan: OrtLoraPlan } | undefined;
  /** Where the adapter trains: "ort-cpu: LoRA" or "tfjs: <why not ONNX Runtime>"; undefined without an engine. */
  readonly engineNote: string | undefined;

  constructor(options: TrainerOptions) {
    const { model, adapter } = options;
    const L = model.numLayers;
    const cut = options.cut ?? { bottom: 0, top: L };
    if (!Number.isInteger(cut.bottom) || !Number.isInteger(cut.top) || cut.bottom < 0 || cut.top < 0 || cut.bottom + cut.top > L) {
      throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `cut (${cut.bottom}, ${cut.top}) needs B, T ≥ 0 and B + T ≤ ${L}`, { field: 'cut' });
    }
    this.model = model;
    this.adapter = adapter;
    this.optimizer = options.optimizer;
    this.schedule = options.schedule;
    this.cut = cut;
    this.maxGradNorm = options.maxGradNorm ?? 0;
    this.noPeek = options.noPeek ?? 0;
    this.trainable = adapter.trainableVariables();
    this.random = randomStateOf(adapter);
    this.ownsMiddle = options.middle === undefined;
    const planned = options.engine ? ortLoraPlan(adapter, model.config) : undefined;
    const reason = planned?.reason ?? (this.noPeek > 0 ? "NoPeek's gradient is computed on tfjs" : undefined);
    this.ort = options.engine && planned?.plan && reason === undefined ? { engine: options.engine, plan: planned.plan } : undefined;
    const where = options.engine ? `${options.engine.provider === 'cuda' ? 'ort-cuda' : 'ort-cpu'}` : '';
    this.engineNote = options.engine ? (this.ort ? `${where}: LoRA r${this.ort.plan.spec.r} on ${this.ort.plan.spec.modules.join(',')}` : `tfjs: ${reason}`) : undefined;
    // A local middle without LoRA runs on the engine too; with LoRA it stays on tfjs's tape.
    const ortMiddle = this.ort && !planTouches(this.ort.plan, cut.bottom, L - cut.top);
    this.middle = options.middle ?? (ortMiddle && this.ort
      ? new OrtMiddle(this.ort.engine, cut.bottom, L - cut.top)
      : new LocalMiddle(model, cut.bottom, L - cut.top, { hooks: adapter.hooks, trainable: this.trainable, random: this.random }));
    this.pipeline = options.pipeline ?? !(this.middle instanceof LocalMiddle || this.middle instanceof OrtMiddle);
    // Which parameters each edge part reaches, from one tiny probe through each part.
    const probeIds = tf.tensor2d([[0, 0]], [1, 2], 'int32');
    const bottom = variablesReached(() => this.bottom(probeIds, false), this.trainable);
    const probeH = tf.zeros([1, 2 + adapter.numVirtualTokens, model.config.hiddenSize]) as tf.Tensor3D;
    const top = variablesReached(() => tf.sum(this.topLogits(probeH, false)), this.trainable);
    tf.dispose([probeIds, probeH]);
    this.bottomVars = [...this.trainable.keys()].filter((n) => bottom.has(n));
    this.topVars = [...this.trainable.keys()].filter((n) => top.has(n));
  }

  /** Optimizer steps completed. */
  get step(): number {
    return this.optimizer.stepCount;
  }

  private get middleEmpty(): boolean {
    return this.cut.bottom === this.model.numLayers - this.cut.top;
  }

  /** Whether the backward round trip through the middle is needed at all. */
  get needsMiddleBackward(): boolean {
    return this.bottomVars.length > 0 || this.middle.trainsParameters;
  }

  private bottom(ids: tf.Tensor2D, training: boolean): tf.Tensor3D {
    return tf.tidy(() => {
      const options = { hooks: this.adapter.hooks, training, positionOffset: 0 };
      const h = this.model.embed(ids, options);
      return this.cut.bottom > 0 ? this.model.blocks(h, 0, this.cut.bottom, options) : h;
    });
  }

  private topLogits(hM: tf.Tensor3D, training: boolean): tf.Tensor3D {
    return tf.tidy(() => {
      const L = this.model.numLayers;
      const h = this.cut.top > 0 ? this.model.blocks(hM, L - this.cut.top, L, { hooks: this.adapter.hooks, training, positionOffset: 0 }) : hM;
      return this.model.head(h, this.adapter.numVirtualTokens);
    });
  }

  /** Bottom, then the middle's forward (started, not awaited). */
  private startForward(batch: Batch, key: MicrobatchKey, training: boolean): InFlight {
    const { ids, labels } = batchTensors(batch);
    const backward = training && this.needsMiddleBackward;
    const bottomTape = backward && this.bottomVars.length > 0
      ? tapedForward(() => this.bottom(ids, training), this.bottomVars.map((n) => this.trainable.get(n) as tf.Variable))
      : undefined;
    const hB = (bottomTape?.output as tf.Tensor3D | undefined) ?? this.bottom(ids, training);
    const noPeekGrad = bottomTape && this.noPeek > 0 ? tf.tidy(() => noPeekGradient(this.model.embed(ids), hB, this.noPeek)) : undefined;
    if (this.middleEmpty) return { ids, labels, bottomTape, hM: Promise.resolve(hB), noPeekGrad };
    const hM = this.middle.forward(hB, key, backward).finally(() => hB.dispose());
    hM.catch(() => undefined); // awaited later; do not report it as unhandled meanwhile
    return { ids, labels, bottomTape, hM, noPeekGrad };
  }

  /**
   * One optimizer step over `microbatches`. Each micro-batch's summed loss is divided by the
   * label tokens of the whole step, so accumulating micro-batches equals the full batch.
   */
  async trainStep(microbatches: readonly Batch[]): Promise<StepResult> {
    if (microbatches.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'a step needs at least one micro-batch', { field: 'microbatches' });
    microbatches.forEach(checkBatch);
    if (this.ort) return this.trainStepOrt(microbatches, this.ort);
    const step = this.step;
    const tokens = labelTokens(microbatches.flatMap((b) => b.labels));
    const scale = 1 / Math.max(tokens, 1);
    const grads = new Map<string, tf.Tensor>();
    const topVars = this.topVars.map((n) => this.trainable.get(n) as tf.Variable);
    let loss = 0;
    let next: InFlight | undefined;
    for (let i = 0; i < microbatches.length; i++) {
      const key = { step, microbatch: i };
      const current = next ?? this.startForward(microbatches[i], key, true);
      next = undefined;
      const { ids, labels } = current;
      const hM = await current.hM;
      // Pipelining: the next micro-batch goes forward while this one finishes.
      if (this.pipeline && i + 1 < microbatches.length) next = this.startForward(microbatches[i + 1], { step, microbatch: i + 1 }, true);
      try {
        const top = gradientsOf(() => {
          const logits = this.topLogits(hM, true);
          return tf.tidy(() => tf.mul(lossSum(logits, labels), scale)) as tf.Scalar;
        }, [hM, ...topVars]);
        const share = top.value.dataSync()[0];
        loss += share;
        top.value.dispose();
        const gM = (top.grads[0] ?? tf.zerosLike(hM)) as tf.Tensor3D;
        top.grads.slice(1).forEach((g, j) => g && accumulate(grads, this.topVars[j], g));
        if (this.needsMiddleBackward) {
          const gRemote = this.middleEmpty ? gM : await this.middle.backward(gM, { ...key, loss: share }, microbatches[i].labels);
          const gB = current.noPeekGrad ? (tf.add(gRemote, current.noPeekGrad) as tf.Tensor3D) : gRemote;
          if (current.bottomTape) current.bottomTape.vjp(gB).forEach((g: tf.Tensor, j: number) => accumulate(grads, this.bottomVars[j], g));
          if (gB !== gRemote) gB.dispose();
          if (gRemote !== gM) gRemote.dispose();
        }
        gM.dispose();
      } finally {
        current.bottomTape?.dispose();
        current.noPeekGrad?.dispose();
        tf.dispose([hM, ids, labels]);
      }
    }
    return this.finishStep(step, grads, loss, tokens, microbatches.length);
  }

  /** The bottom on the engine, then the middle's forward (started, not awaited). */
  private async startForwardOrt(batch: Batch, key: MicrobatchKey, training: boolean, ort: { engine: OrtLlama; plan: OrtLoraPlan }, params: LoraParams): Promise<OrtInFlight> {
    const b = batch.ids.length;
    const s = batch.ids[0].length;
    const ids = Int32Array.from(batch.ids.flat());
    const labels = Int32Array.from(batch.labels.flat());
    const backward = training && this.needsMiddleBackward;
    const bottom = await ort.engine.bottom(ids, b, s, this.cut.bottom, ort.plan.spec, params, backward);
    const hB = tf.tensor3d(bottom.output, [b, s, this.model.config.hiddenSize]);
    if (this.middleEmpty) return { labels, shape: [b, s], bottom, hM: Promise.resolve(hB) };
    const hM = this.middle.forward(hB, key, backward).finally(() => hB.dispose());
    hM.catch(() => undefined); // awaited later
    return { labels, shape: [b, s], bottom, hM };
  }

  /** trainStep with the frozen work on ONNX Runtime: the same losses and gradients, the same optimizer step. */
  private async trainStepOrt(microbatches: readonly Batch[], ort: { engine: OrtLlama; plan: OrtLoraPlan }): Promise<StepResult> {
    const step = this.step;
    const tokens = labelTokens(microbatches.flatMap((b) => b.labels));
    const scale = 1 / Math.max(tokens, 1);
    const params = loraParamsOf(ort.plan);
    const grads = new Map<string, tf.Tensor>();
    const L = this.model.numLayers;
    const backward = this.needsMiddleBackward;
    let loss = 0;
    let next: Promise<OrtInFlight> | undefined;
    for (let i = 0; i < microbatches.length; i++) {
      const key = { step, microbatch: i };
      const current = await (next ?? this.startForwardOrt(microbatches[i], key, true, ort, params));
      next = undefined;
      const hM = await current.hM;
      if (this.pipeline && i + 1 < microbatches.length) {
        next = this.startForwardOrt(microbatches[i + 1], { step, microbatch: i + 1 }, true, ort, params);
        next.catch(() => undefined);
      }
      try {
        const [b, s] = current.shape;
        const h = (await hM.data()) as Float32Array;
        const top = await ort.engine.topStep(h, current.labels, b, s, L - this.cut.top, ort.plan.spec, params, { tokenWeight: scale, withDh: backward });
        loss += top.loss;
        addLoraGrads(grads, ort.plan, top.grads);
        if (backward && top.dh) {
          const gM = tf.tensor3d(top.dh, hM.shape);
          const gB = this.middleEmpty ? gM : await this.middle.backward(gM, { ...key, loss: top.loss }, microbatches[i].labels);
          try {
            if (current.bottom.backward) addLoraGrads(grads, ort.plan, await current.bottom.backward((await gB.data()) as Float32Array));
          } finally {
            tf.dispose(gB === gM ? [gM] : [gM, gB]);
          }
        }
      } finally {
        hM.dispose();
      }
    }
    return this.finishStep(step, grads, loss, tokens, microbatches.length);
  }

  /** The middle's own gradients, clipping and the optimizer step. */
  private async finishStep(step: number, grads: Map<string, tf.Tensor>, loss: number, tokens: number, microbatches: number): Promise<StepResult> {
    for (const [name, g] of this.middle.takeGradients?.() ?? []) accumulate(grads, name, g);
    const lr = learningRate(this.schedule, step);
    let gradNorm: number;
    if (this.middle.commitStep !== undefined) {
      // The middle's parameters live elsewhere (the cloud's held adapter): it steps them now,
      // and clipping spans its gradients and these together, as it would in one process.
      const edgeGradSquareSum = globalNorm(grads) ** 2;
      const { middleGradSquareSum } = await this.middle.commitStep({ step, lr, maxGradNorm: this.maxGradNorm, edgeGradSquareSum, microbatches });
      gradNorm = Math.sqrt(edgeGradSquareSum + middleGradSquareSum);
      if (this.maxGradNorm > 0) scaleGradients(grads, this.maxGradNorm / (gradNorm + 1e-6));
    } else {
      gradNorm = this.maxGradNorm > 0 ? clipGradNorm(grads, this.maxGradNorm) : globalNorm(grads);
    }
    this.adapter.projectGradients?.(grads);
    this.optimizer.step(this.trainable, grads, lr);
    tf.dispose([...grads.values()]);
    return { step: this.step, loss, tokens, lr, gradNorm };
  }

  /** Forward only, through the middle: summed loss and per-row log-likelihoods of the label tokens. */
  async score(batch: Batch, microbatch = 0): Promise<BatchScore> {
    checkBatch(batch);
    if (this.ort) return this.scoreOrt(batch, microbatch, this.ort);
    const { ids, labels, hM } = this.startForward(batch, { step: this.step, microbatch, eval: true }, false);
    const h = await hM;
    try {
      const logits = this.topLogits(h, false);
      try {
        return scoreLogits(logits, labels, batch.labels);
      } finally {
        logits.dispose();
      }
    } finally {
      tf.dispose([h, ids, labels]);
    }
  }

  private async scoreOrt(batch: Batch, microbatch: number, ort: { engine: OrtLlama; plan: OrtLoraPlan }): Promise<BatchScore> {
    const params = loraParamsOf(ort.plan);
    const current = await this.startForwardOrt(batch, { step: this.step, microbatch, eval: true }, false, ort, params);
    const hM = await current.hM;
    let data: Float32Array;
    try {
      data = await ort.engine.topLogits((await hM.data()) as Float32Array, current.shape[0], current.shape[1], this.model.numLayers - this.cut.top, ort.plan.spec, params);
    } finally {
      hM.dispose();
    }
    const logits = tf.tensor3d(data, [current.shape[0], current.shape[1], this.model.config.vocabSize]);
    const labels = tf.tensor2d(current.labels, current.shape, 'int32');
    try {
      return scoreLogits(logits, labels, batch.labels);
    } finally {
      tf.dispose([logits, labels]);
    }
  }

  dispose(): void {
    if (this.ownsMiddle) this.middle.dispose?.();
  }
}

/** clip_grad_norm_'s scaling by a coefficient found elsewhere: applied when it is below 1. */
function scaleGradients(grads: Map<string, tf.Tensor>, coef: number): void {
  if (coef >= 1) return;
  for (const [name, g] of grads) {
    grads.set(name, tf.tidy(() => tf.mul(g, coef)));
    g.dispose();
  }
}

function globalNorm(grads: Map<string, tf.Tensor>): number {
  if (grads.size === 0) return 0;
  return tf.tidy(() => Math.sqrt(tf.addN([...grads.values()].map((g) => tf.sum(tf.square(g)))).dataSync()[0]));
}

/** The summed causal-LM negative log-likelihood of the label tokens. */
function lossSum(logits: tf.Tensor3D, labels: tf.Tensor2D): tf.Scalar {
  return tf.neg(tf.sum(rowLogLikelihood(logits, labels))) as tf.Scalar;
}
