// Evaluation: loss and perplexity over rows, and classification accuracy by scoring each
// candidate label word and taking the most likely one.
import { tf } from '../backend.ts';
import type { OrtLlama } from '../engine/ort-llama.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { IGNORE_INDEX } from '../loss.ts';
import type { Adapter } from '../peft/adapter.ts';
import { labelRow, padRow } from './data.ts';
import type { Row, TextTokenizer } from './data.ts';
import { batchTensors } from './batch.ts';
import type { Batch, BatchScore } from './batch.ts';

/** Anything that scores batches forward-only: the Trainer (through its middle) or a local model. */
export interface Scorer {
  score(batch: Batch): Promise<BatchScore>;
}

/** Label tokens that count in a causal-LM loss: positions t ≥ 1 whose label is not IGNORE_INDEX. */
export function labelTokens(labels: readonly (readonly number[])[]): number {
  let n = 0;
  for (const row of labels) for (let t = 1; t < row.length; t++) if (row[t] !== IGNORE_INDEX) n++;
  return n;
}

/** Per row, the summed log-probability of each label token given the tokens before it. */
export function rowLogLikelihood(logits: tf.Tensor3D, labels: tf.Tensor2D): tf.Tensor1D {
  return tf.tidy(() => {
    const [b, s, v] = logits.shape;
    const shifted = tf.slice(logits, [0, 0, 0], [b, s - 1, v]);
    const target = tf.slice(labels, [0, 1], [b, s - 1]);
    const valid = tf.notEqual(target, tf.scalar(IGNORE_INDEX, 'int32'));
    const safe = tf.where(valid, target, tf.zerosLike(target)) as tf.Tensor2D;
    const picked = tf.sum(tf.mul(tf.logSoftmax(shifted), tf.oneHot(safe, v)), -1);
    return tf.sum(tf.mul(picked, tf.cast(valid, 'float32')), -1) as tf.Tensor1D;
  });
}

/** Scores from logits and labels held as arrays. */
export function scoreLogits(logits: tf.Tensor3D, labels: tf.Tensor2D, labelRows: readonly (readonly number[])[]): BatchScore {
  const perRow = rowLogLikelihood(logits, labels);
  const rows = Array.from(perRow.dataSync());
  perRow.dispose();
  return { lossSum: -rows.reduce((a, b) => a + b, 0), tokens: labelTokens(labelRows), rowLogLikelihood: rows, rowTokens: labelRows.map((r) => labelTokens([r])) };
}

/** The whole model in this process, with an adapter's hooks when given. */
export function localScorer(model: LlamaModel, adapter?: Adapter): Scorer {
  return {
    async score(batch) {
      const { ids, labels } = batchTensors(batch);
      const logits = model.forward(ids, { hooks: adapter?.hooks });
      try {
        return scoreLogits(logits, labels, batch.labels);
      } finally {
        tf.dispose([ids, labels, logits]);
      }
    },
  };
}

/** The whole model on ONNX Runtime (an adapter merged into its weights beforehand). */
export function ortScorer(engine: OrtLlama): Scorer {
  return {
    async score(batch) {
      const b = batch.ids.length;
      const s = batch.ids[0]?.length ?? 0;
      const data = await engine.logits(Int32Array.from(batch.ids.flat()), b, s);
      const logits = tf.tensor3d(data, [b, s, engine.config.vocabSize]);
      const labels = tf.tensor2d(Int32Array.from(batch.labels.flat()), [b, s], 'int32');
      try {
        return scoreLogits(logits, labels, batch.labels);
      } finally {
        tf.dispose([logits, labels]);
      }
    },
  };
}

export interface LmEvaluation {
  /** Mean negative log-likelihood per label token. */
  loss: number;
  perplexity: number;
  tokens: number;
}

/** Loss and perplexity over rows of one length, in batches. */
export async function evaluateRows(scorer: Scorer, rows: readonly Row[], batchSize: number): Promise<LmEvaluation> {
  let sum = 0;
  let tokens = 0;
  for (let i = 0; i < rows.length; i += batchSize) {
    const chunk = rows.slice(i, i + batchSize);
    const s = await scorer.score({ ids: chunk.map((r) => r.ids), labels: chunk.map((r) => r.labels) });
    sum += s.lossSum;
    tokens += s.tokens;
  }
  const loss = tokens === 0 ? NaN : sum / tokens;
  return { loss, perplexity: Math.exp(loss), tokens };
}

export interface ClassificationEvaluation {
  accuracy: number;
  count: number;
}

/**
 * Accuracy of picking, for each record, the candidate label whose word the model finds most
 * likely after the text (summed log-likelihood of the label's tokens).
 */
export async function evaluateClassification(
  scorer: Scorer,
  tokenizer: TextTokenizer,
  records: readonly { text: string; label: string }[],
  labels: readonly string[],
  seqLen: number,
): Promise<ClassificationEvaluation> {
  let correct = 0;
  for (const record of records) {
    const rows = labels.map((l) => labelRow(tokenizer, record.text, l, seqLen));
    const length = Math.max(...rows.map((r) => r.ids.length));
    const padded = rows.map((r) => padRow(r, length, tokenizer.eosTokenId ?? 0));
    const s = await scorer.score({ ids: padded.map((r) => r.ids), labels: padded.map((r) => r.labels) });
    let best = 0;
    for (let i = 1; i < labels.length; i++) if (s.rowLogLikelihood[i] > s.rowLogLikelihood[best]) best = i;
    if (labels[best] === record.label) correct++;
  }
  return { accuracy: records.length === 0 ? NaN : correct / records.length, count: records.length };
}
