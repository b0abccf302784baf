// Validation loss and, for label data, accuracy: each candidate label is scored after the
// text and the most likely one is the prediction. Everything runs forward-only through the
// trainer, so in split mode the middle is the cloud's.
import { labelRow, padRow } from '../model/index.ts';
import type { Batch, PreparedData, Row, TextTokenizer, Trainer } from '../model/index.ts';

export interface EvalResult {
  /** Mean loss per label token over the validation rows. */
  valLoss: number;
  valTokens: number;
  /** Label data: fraction of validation records whose label scores highest; null otherwise. */
  accuracy: number | null;
  records: number;
}

function batches(rows: readonly Row[], size: number, pad: number): Batch[] {
  const out: Batch[] = [];
  for (let i = 0; i < rows.length; i += size) {
    const group = rows.slice(i, i + size);
    const len = Math.max(...group.map((r) => r.ids.length));
    const padded = group.map((r) => padRow(r, len, pad));
    out.push({ ids: padded.map((r) => r.ids), labels: padded.map((r) => r.labels) });
  }
  return out;
}

export async function evaluate(trainer: Trainer, data: PreparedData, tokenizer: TextTokenizer, options: { batchSize: number; seqLen: number; maxRecords?: number }): Promise<EvalResult> {
  const pad = tokenizer.eosTokenId ?? 0;
  let lossSum = 0;
  let tokens = 0;
  for (const b of batches(data.validation, options.batchSize, pad)) {
    const s = await trainer.score(b);
    lossSum += s.lossSum;
    tokens += s.tokens;
  }
  let accuracy: number | null = null;
  const cls = data.classification;
  let records = data.validation.length;
  if (cls && cls.validation.length > 0) {
    const recs = cls.validation.slice(0, options.maxRecords ?? cls.validation.length);
    records = recs.length;
    const rows = recs.flatMap((r) => cls.labels.map((label) => labelRow(tokenizer, r.text, label, options.seqLen)));
    const scores: number[] = [];
    for (const b of batches(rows, Math.max(options.batchSize, cls.labels.length), pad)) scores.push(...(await trainer.score(b)).rowLogLikelihood);
    let correct = 0;
    recs.forEach((r, i) => {
      const mine = scores.slice(i * cls.labels.length, (i + 1) * cls.labels.length);
      const best = mine.indexOf(Math.max(...mine));
      if (cls.labels[best] === r.label) correct++;
    });
    accuracy = correct / recs.length;
  }
  return { valLoss: tokens > 0 ? lossSum / tokens : Number.NaN, valTokens: tokens, accuracy, records };
}
