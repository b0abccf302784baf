// Sequence classification on a decoder: the final hidden states (after the model's final norm)
// mean-pooled over a row's real tokens, then a linear score head [hidden → labels] trained with
// the adapter (PEFT's `modules_to_save = ["score"]` with LoRA). Cross-entropy, AdamW. For tasks
// the LM head's label words cannot learn on a small model (the federation bench's sentiment).
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { PeftAdapter } from '../peft/index.ts';
import { Rng } from '../random.ts';
import type { TextTokenizer } from './data.ts';
import { createOptimizer } from './optimizer.ts';
import type { Optimizer } from './optimizer.ts';

export const SCORE_WEIGHT = 'score.weight';
export const SCORE_BIAS = 'score.bias';

/** One labelled row: token ids (unpadded) and its class. */
export interface ClassifiedRow {
  ids: number[];
  label: number;
}

/** Rows of "text", class index pairs, truncated to `seqLen` tokens. */
export function classifiedRows(tokenizer: TextTokenizer, records: readonly { text: string; label: number }[], seqLen: number): ClassifiedRow[] {
  return records.map((r) => ({ ids: tokenizer.encode(r.text).slice(0, seqLen), label: r.label }));
}

export interface SequenceClassifierOptions {
  model: LlamaModel;
  adapter: PeftAdapter;
  numLabels: number;
  /** Seed of the head's initialisation. */
  seed?: number;
}

export class SequenceClassifier {
  readonly model: LlamaModel;
  readonly adapter: PeftAdapter;
  readonly numLabels: number;
  readonly #head: Map<string, tf.Variable>;

  constructor(options: SequenceClassifierOptions) {
    const { model, numLabels } = options;
    if (!Number.isInteger(numLabels) || numLabels < 2) throw new ModelError('TANDEM_INPUT_INVALID', `numLabels must be an integer ≥ 2, got ${numLabels}`, { field: 'numLabels' });
    this.model = model;
    this.adapter = options.adapter;
    this.numLabels = numLabels;
    const rng = new Rng(options.seed ?? 0);
    const d = model.config.hiddenSize;
    const std = 1 / Math.sqrt(d);
    const w = Float32Array.from({ length: numLabels * d }, () => (rng.nextU32() / 2 ** 32 - 0.5) * 2 * std);
    this.#head = new Map([
      [SCORE_WEIGHT, tf.variable(tf.tensor2d(w, [numLabels, d]), true, `score_weight_${Math.random().toString(36).slice(2)}`)],
      [SCORE_BIAS, tf.variable(tf.zeros([numLabels]), true, `score_bias_${Math.random().toString(36).slice(2)}`)],
    ]);
  }

  /** Everything trained: the adapter's variables and the score head, by PEFT key. */
  trainableVariables(): Map<string, tf.Variable> {
    return new Map([...this.adapter.trainableVariables(), ...this.#head]);
  }

  /** Class logits [batch, labels] of rows (right-padded; padding is left out of the mean). */
  logits(rows: readonly ClassifiedRow[], training: boolean): tf.Tensor2D {
    return tf.tidy(() => {
      const len = Math.max(1, ...rows.map((r) => r.ids.length));
      const ids = tf.tensor2d(rows.map((r) => Array.from({ length: len }, (_, i) => r.ids[i] ?? 0)), [rows.length, len], 'int32');
      const mask = tf.tensor2d(rows.map((r) => Array.from({ length: len }, (_, i) => (i < r.ids.length ? 1 : 0))), [rows.length, len]);
      const options = { hooks: this.adapter.hooks, training, positionOffset: 0 };
      const h0 = this.model.blocks(this.model.embed(ids, options), 0, this.model.numLayers, options);
      const v = this.adapter.numVirtualTokens;
      const h = v > 0 ? tf.slice(h0, [0, v, 0], [rows.length, len, h0.shape[2]]) : h0;
      const eps = this.model.config.rmsNormEps;
      const normed = tf.mul(tf.mul(h, tf.rsqrt(tf.add(tf.mean(tf.square(h), -1, true), eps))), this.model.weight('model.norm.weight'));
      const m = tf.expandDims(mask, -1);
      const pooled = tf.div(tf.sum(tf.mul(normed, m), 1), tf.sum(m, 1)) as tf.Tensor2D;
      return tf.add(tf.matMul(pooled, this.#head.get(SCORE_WEIGHT)!, false, true), this.#head.get(SCORE_BIAS)!) as tf.Tensor2D;
    });
  }

  /** Mean cross-entropy of a batch. */
  loss(rows: readonly ClassifiedRow[], training: boolean): tf.Scalar {
    return tf.tidy(() => tf.losses.softmaxCrossEntropy(tf.oneHot(tf.tensor1d(rows.map((r) => r.label), 'int32'), this.numLabels), this.logits(rows, training)) as tf.Scalar);
  }

  /**
   * `steps` AdamW steps on batches drawn (seeded) from `rows`; a new optimizer each call (a
   * federated round's local training starts from the global weights). Returns the losses.
   */
  train(rows: readonly ClassifiedRow[], options: { steps: number; batchSize: number; lr: number; seed: number; weightDecay?: number; maxGradNorm?: number }): number[] {
    if (rows.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'no rows to train on', { field: 'rows' });
    const params = this.trainableVariables();
    const optimizer: Optimizer = createOptimizer('adamw', { weightDecay: options.weightDecay ?? 0 });
    const rng = new Rng(options.seed);
    const losses: number[] = [];
    try {
      for (let s = 0; s < options.steps; s++) {
        const batch = Array.from({ length: Math.min(options.batchSize, rows.length) }, () => rows[rng.nextU32() % rows.length]);
        const { value, grads } = tf.variableGrads(() => this.loss(batch, true), [...params.values()]);
        losses.push(value.dataSync()[0]);
        value.dispose();
        const byKey = new Map<string, tf.Tensor>();
        for (const [k, v] of params) if (grads[v.name]) byKey.set(k, grads[v.name]);
        if (options.maxGradNorm) {
          const norm = tf.tidy(() => Math.sqrt(tf.addN([...byKey.values()].map((g) => tf.sum(tf.square(g)))).dataSync()[0]));
          if (norm > options.maxGradNorm) for (const [k, g] of byKey) byKey.set(k, tf.tidy(() => tf.mul(g, options.maxGradNorm! / norm)));
        }
        this.adapter.projectGradients?.(byKey);
        optimizer.step(params, byKey, options.lr);
        tf.dispose([...Object.values(grads), ...byKey.values()]);
      }
    } finally {
      optimizer.dispose();
    }
    return losses;
  }

  /** Fraction of rows whose highest logit is their label. */
  accuracy(rows: readonly ClassifiedRow[], batchSize = 64): number {
    let right = 0;
    for (let i = 0; i < rows.length; i += batchSize) {
      const batch = rows.slice(i, i + batchSize);
      const predicted = tf.tidy(() => tf.argMax(this.logits(batch, false), 1).dataSync());
      batch.forEach((r, j) => (right += predicted[j] === r.label ? 1 : 0));
    }
    return rows.length ? right / rows.length : NaN;
  }

  /** Every trainable value, flat in sorted-key order (what a federation averages). */
  getFlat(): Float32Array {
    const params = this.trainableVariables();
    const parts = [...params.keys()].sort().map((k) => params.get(k)!.dataSync() as Float32Array);
    const out = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }

  setFlat(values: Float32Array): void {
    const params = this.trainableVariables();
    let o = 0;
    for (const k of [...params.keys()].sort()) {
      const v = params.get(k)!;
      if (o + v.size > values.length) throw new ModelError('TANDEM_INPUT_INVALID', `${values.length} values are too few for the classifier`, { field: 'values' });
      tf.tidy(() => v.assign(tf.tensor(values.subarray(o, o + v.size), v.shape)));
      o += v.size;
    }
    if (o !== values.length) throw new ModelError('TANDEM_INPUT_INVALID', `${values.length} values for a classifier of ${o}`, { field: 'values' });
  }

  dispose(): void {
    tf.dispose([...this.#head.values()]);
  }
}
