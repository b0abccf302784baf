// Distillation of the kept blocks to imitate the full middle (Offsite-Tuning §3.3): the
// bottom and top stay frozen, the teacher is the full middle on the same h_B, and the loss is
//   LM cross-entropy of the emulated model + λ · mean((h_teacher − h_emulator)²) / mean(h_teacher²)
// (the hidden-state MSE normalized by the teacher's mean square, as the reference code does).
import { AdamW, BatchStream, causalLmLoss, clipGradNorm, gradients, layerOf, learningRate, tf } from '../model/index.ts';
import type { LlamaModel, OrtLlama, Row } from '../model/index.ts';
import type { EmulatorLayout } from './layer-drop.ts';

/** λ of the paper's recipe. */
export const DEFAULT_DISTILL_LAMBDA = 30;

export interface DistillOptions {
  steps: number;
  lambda: number;
  lr: number;
  batchSize: number;
  seed: number;
  /** Global gradient-norm limit; 0 turns clipping off. */
  clip?: number;
  onStep?: (e: { step: number; steps: number; loss: number; lmLoss: number; kdLoss: number }) => void;
  /** The full model on ONNX Runtime: the frozen bottom and the teacher run there; the kept blocks still train on tfjs. */
  engine?: OrtLlama;
}

export interface DistillResult {
  /** Means over the last tenth of the steps (at least one). */
  finalLoss: number;
  finalLmLoss: number;
  finalKdLoss: number;
}

/** h_B and the full middle's output on the engine, as tensors. */
async function teacherOnEngine(engine: OrtLlama, ids: readonly (readonly number[])[], bottom: number, middleEnd: number): Promise<{ hB: tf.Tensor3D; hTeacher: tf.Tensor3D; teacherMs: tf.Scalar }> {
  const b = ids.length;
  const s = ids[0].length;
  const shape: [number, number, number] = [b, s, engine.config.hiddenSize];
  const h = (await engine.bottom(Int32Array.from(ids.flat()), b, s, bottom, undefined, undefined, false)).output;
  const t = await engine.blocks(h, b, s, bottom, middleEnd);
  const hTeacher = tf.tensor3d(t, shape);
  return { hB: tf.tensor3d(h, shape), hTeacher, teacherMs: tf.tidy(() => tf.mean(tf.square(hTeacher))) as tf.Scalar };
}

/**
 * Trains every weight of the emulated model's kept blocks [B, B+K) in place. `full` is the
 * teacher (all L blocks, frozen); `emulated` holds the same bottom and top and the kept blocks
 * renumbered (emulatedWeights).
 */
export async function distillEmulator(full: LlamaModel, emulated: LlamaModel, layout: EmulatorLayout, rows: readonly Row[], options: DistillOptions): Promise<DistillResult> {
  const B = layout.cut.bottom;
  const K = layout.kept.length;
  const L = layout.numLayers;
  const T = layout.cut.top;
  const params = new Map([...emulated.weights].filter(([name]) => {
    const l = layerOf(name);
    return l !== undefined && l >= B && l < B + K;
  }));
  const stream = new BatchStream(rows, options.batchSize, options.seed);
  const optimizer = new AdamW({ weightDecay: 0 });
  const schedule = { kind: 'cosine' as const, lr: options.lr, warmupSteps: 0, totalSteps: options.steps };
  const history: { loss: number; lm: number; kd: number }[] = [];
  for (const v of params.values()) v.trainable = true;
  try {
    for (let step = 0; step < options.steps; step++) {
      const batch = stream.next();
      const rowsN = batch.ids.length;
      const seq = batch.ids[0].length;
      const ids = tf.tensor2d(batch.ids.flat(), [rowsN, seq], 'int32');
      const labels = tf.tensor2d(batch.labels.flat(), [rowsN, seq], 'int32');
      // The teacher and the frozen bottom run without a tape.
      const { hB, hTeacher, teacherMs } = options.engine ? await teacherOnEngine(options.engine, batch.ids, B, L - T) : tf.tidy(() => {
        const h = full.blocks(full.embed(ids), 0, B);
        const t = full.blocks(h, B, L - T);
        return { hB: h, hTeacher: t, teacherMs: tf.mean(tf.square(t)) };
      });
      let lm = 0;
      let kd = 0;
      const trained = [...params.values()];
      const { value, grads } = gradients(() => {
        const hS = emulated.blocks(hB, B, B + K, { training: true });
        const kdLoss = tf.div(tf.mean(tf.square(tf.sub(hTeacher, hS))), teacherMs);
        const logits = emulated.head(emulated.blocks(hS, B + K, B + K + T, { training: true }));
        const { loss: lmLoss, sum } = causalLmLoss(logits, labels);
        sum.dispose();
        lm = lmLoss.dataSync()[0];
        kd = kdLoss.dataSync()[0];
        return tf.add(lmLoss, tf.mul(kdLoss, options.lambda)) as tf.Scalar;
      }, trained);
      const loss = value.dataSync()[0];
      const byName = new Map<string, tf.Tensor>();
      [...params.keys()].forEach((name, i) => {
        const g = grads[i];
        if (g) byName.set(name, g);
      });
      if ((options.clip ?? 1) > 0) clipGradNorm(byName, options.clip ?? 1);
      optimizer.step(params, byName, learningRate(schedule, step));
      tf.dispose([value, ids, labels, hB, hTeacher, teacherMs, ...byName.values()]);
      history.push({ loss, lm, kd });
      options.onStep?.({ step: step + 1, steps: options.steps, loss, lmLoss: lm, kdLoss: kd });
    }
  } finally {
    for (const v of params.values()) v.trainable = false;
    optimizer.dispose();
  }
  const tail = history.slice(-Math.max(1, Math.floor(history.length / 10)));
  const mean = (f: (h: { loss: number; lm: number; kd: number }) => number) => tail.reduce((a, h) => a + f(h), 0) / tail.length;
  return { finalLoss: mean((h) => h.loss), finalLmLoss: mean((h) => h.lm), finalKdLoss: mean((h) => h.kd) };
}
