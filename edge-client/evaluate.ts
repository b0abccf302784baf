// Validation loss and, for label data, accuracy, with model/train's evaluation run
// forward-only through the trainer, so in split mode the middle is the cloud's.
import { evaluateClassification, evaluateRows } from '../model/index.ts';
import type { PreparedData, TextTokenizer, Trainer } from '../model/index.ts';

export interface EvalResult {
  /** Mean loss per label token over the validation rows. */
  valLoss: number;
  valTokens: number;
  /** Label data: fraction of validation records whose label scores highest; null otherwise. */
  accuracy: number | null;
  records: number;
}

export async function evaluate(trainer: Trainer, data: PreparedData, tokenizer: TextTokenizer, options: { batchSize: number; seqLen: number }): Promise<EvalResult> {
  const lm = await evaluateRows(trainer, data.validation, options.batchSize);
  const cls = data.classification;
  if (!cls || cls.validation.length === 0) return { valLoss: lm.loss, valTokens: lm.tokens, accuracy: null, records: data.validation.length };
  const c = await evaluateClassification(trainer, tokenizer, cls.validation, cls.labels, options.seqLen);
  return { valLoss: lm.loss, valTokens: lm.tokens, accuracy: c.accuracy, records: c.count };
}
