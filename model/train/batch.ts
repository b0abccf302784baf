// One micro-batch of token ids and labels, as arrays and as the tensors a forward takes.
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';

/** Token ids and labels of one micro-batch, [rows][seq], all rows of one length. */
export interface Batch {
  ids: number[][];
  labels: number[][];
}

export interface BatchScore {
  /** Summed negative log-likelihood over the batch's label tokens. */
  lossSum: number;
  tokens: number;
  /** Per row: summed log-likelihood of its label tokens. */
  rowLogLikelihood: number[];
  rowTokens: number[];
}

export function checkBatch(batch: Batch): void {
  const rows = batch.ids.length;
  const seq = batch.ids[0]?.length ?? 0;
  if (rows === 0 || seq < 2 || batch.labels.length !== rows || batch.ids.some((r, i) => r.length !== seq || batch.labels[i].length !== seq)) {
    throw new ModelError('TANDEM_INPUT_INVALID', 'a batch needs rows of ids and labels of one length of at least 2', { field: 'batch' });
  }
}

/** The batch as int32 tensors [rows, seq]; the caller disposes them. */
export function batchTensors(batch: Batch): { ids: tf.Tensor2D; labels: tf.Tensor2D } {
  const rows = batch.ids.length;
  const seq = batch.ids[0].length;
  return { ids: tf.tensor2d(batch.ids.flat(), [rows, seq], 'int32'), labels: tf.tensor2d(batch.labels.flat(), [rows, seq], 'int32') };
}
