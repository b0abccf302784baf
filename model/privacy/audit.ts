// `tandem audit`: the honest-but-curious cloud's attacks on one model, one data file and one
// cut, with and without the defenses, reported as numbers the data owner can act on.
import { tf } from '../backend.ts';
import { initBackend } from '../backend.ts';
import { loadModelFolder } from '../checkpoint.ts';
import { LlamaModel } from '../llama/llama.ts';
import { Rng } from '../random.ts';
import { checkTokenizerFits, loadTokenizer } from '../tokenizer.ts';
import type { Batch } from '../train/batch.ts';
import { labelRow, padId, padRow, readDataset } from '../train/data.ts';
import type { Dataset, TextTokenizer } from '../train/data.ts';
import { rowLogLikelihood } from '../train/evaluate.ts';
import { autoDefenses, checkDefenses, describeDefenses, medianTokenNorm, spreadScales } from './defenses.ts';
import type { Defenses } from './defenses.ts';
import { PrivacyError } from './errors.ts';
import { baseBottom, learnedInversion, nearestNeighbourInversion, observedBottom } from './inversion.ts';
import { labelLeakage, middleGradients } from './label-leak.ts';

export interface AuditOptions {
  modelDir: string;
  dataFile: string;
  /** Public text the attacker trains its learned inversion on; default: the second half of the data's tokens (an attacker with in-distribution text). */
  publicFile?: string;
  cut?: { bottom: number; top: number };
  defenses?: Defenses | 'auto';
  /** Rows attacked by inversion, of `seqLen` tokens each. */
  rows?: number;
  seqLen?: number;
  /** Classification examples whose g_M is attacked. */
  labelExamples?: number;
  microbatch?: number;
  seed?: number;
  backend?: string;
}

export interface AttackFigures {
  defenses: string;
  bottom: number;
  /** Best of the two inversions: what a cloud would use. */
  tokenRecovery: number;
  nearestNeighbourRecovery: number;
  learnedRecovery: number;
  tokensAttacked: number;
  /** Only for {"text","label"} data. */
  labelLeakAucNorm?: number;
  labelLeakAucDirection?: number;
  /** Relative rise of the base model's loss when h_B carries the noise (forward only, no training). */
  forwardLossCost: number;
}

export interface AuditReport {
  model: string;
  data: string;
  cut: { bottom: number; top: number };
  undefended: AttackFigures;
  defended?: AttackFigures;
  /** Set when --defense auto chose the defenses from the measurements. */
  autoChosen?: string;
}

export const AUDIT_LIMITS = { rows: 256, seqLen: 128, labelExamples: 2048, microbatch: 256 } as const;

function checkInt(value: number, field: string, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `${field} must be an integer in [${min}, ${max}], got ${value}`, { field, details: { limit: max } });
  }
  return value;
}

/** Every token of the data (texts, prompts and completions, label texts) in one stream, each example after a bos. */
export function tokenStream(dataset: Dataset, tokenizer: TextTokenizer): number[] {
  const out: number[] = [];
  for (const e of dataset.examples) {
    const text = e.kind === 'completion' ? e.prompt + e.completion : e.text;
    out.push(...tokenizer.encode(text, { addSpecialTokens: true }));
  }
  return out;
}

/** Consecutive rows of `seqLen` tokens from a stream. */
export function streamRows(stream: readonly number[], seqLen: number, max: number): number[][] {
  const rows: number[][] = [];
  for (let i = 0; i + seqLen <= stream.length && rows.length < max; i += seqLen) rows.push(stream.slice(i, i + seqLen));
  return rows;
}

/** The classification examples as one padded batch and their labels. */
export function labelBatch(dataset: Dataset, tokenizer: TextTokenizer, max: number, seqLen: number): { batch: Batch; classes: string[] } | undefined {
  const records = dataset.examples.flatMap((e) => (e.kind === 'label' ? [e] : [])).slice(0, max);
  if (records.length === 0) return undefined;
  const rows = records.map((e) => labelRow(tokenizer, e.text, e.label, seqLen));
  const len = Math.max(...rows.map((r) => r.ids.length));
  const padded = rows.map((r) => padRow(r, len, padId(tokenizer)));
  return { batch: { ids: padded.map((r) => r.ids), labels: padded.map((r) => r.labels) }, classes: records.map((e) => e.label) };
}

/** The noise defense with its clip (and spread shape) fixed from the data when left to be measured (clip 0). */
export function resolveClip(model: LlamaModel, rows: readonly (readonly number[])[], bottom: number, defenses: Defenses): Defenses {
  const noise = defenses.noise;
  if (!noise || (noise.clip > 0 && (!noise.spread || noise.scales))) return defenses;
  const h = baseBottom(model, rows, bottom);
  const clip = noise.clip > 0 ? noise.clip : medianTokenNorm(h, model.config.hiddenSize) || 1;
  return { ...defenses, noise: { ...noise, clip, ...(noise.spread && !noise.scales ? { scales: spreadScales(h, model.config.hiddenSize) } : {}) } };
}

/** Mean label-token loss of the base over rows, h_B noised by the defense when it has one. */
export function forwardLoss(model: LlamaModel, batch: Batch, bottom: number, topBlocks: number, defenses: Defenses, rng: Rng): number {
  const seq = batch.ids[0].length;
  const d = model.config.hiddenSize;
  const h = observedBottom(model, batch.ids, bottom, defenses, rng);
  return tf.tidy(() => {
    const shape: [number, number, number] = [batch.ids.length, seq, d];
    const hB = tf.tensor3d(h, shape);
    const top = model.numLayers - topBlocks;
    let hM = model.blocks(hB, bottom, top, { positionOffset: 0 });
    // As DefendedMiddle: the edge takes its perturbation back out of h_M before its top.
    if (defenses.noise && defenses.noise.restore !== false) hM = tf.add(hM, tf.sub(tf.tensor3d(baseBottom(model, batch.ids, bottom), shape), hB));
    const logits = model.head(model.blocks(hM, top, model.numLayers, { positionOffset: 0 }));
    const labels = tf.tensor2d(batch.labels.flat(), [batch.ids.length, seq], 'int32');
    const ll = tf.sum(rowLogLikelihood(logits, labels)).dataSync()[0];
    let tokens = 0;
    for (const row of batch.labels) for (let t = 1; t < row.length; t++) if (row[t] >= 0) tokens++;
    return -ll / Math.max(tokens, 1);
  });
}

export interface MeasureInput {
  model: LlamaModel;
  rows: number[][];
  publicRows: number[][];
  labels?: { batch: Batch; classes: string[] };
  cut: { bottom: number; top: number };
  microbatch: number;
  seed: number;
  /** The edge after training (training-cost.ts): the attacks face what its trained bottom sends, not the base's h_B. */
  edge?: { sent(rows: readonly (readonly number[])[], rng: Rng): Float32Array; applied: Defenses };
}

/** All attacks at one cut under one set of defenses (a deeper bottom moves the cut here). */
export function measureAttacks(input: MeasureInput, defenses: Defenses): AttackFigures {
  const { model, rows, publicRows, labels, microbatch, seed } = input;
  const bottom = input.cut.bottom + (defenses.deeperBottom ?? 0);
  const cut = { bottom, top: input.cut.top };
  if (bottom + cut.top > model.numLayers) {
    throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `cut (${bottom}, ${cut.top}) with the deeper bottom leaves no middle in ${model.numLayers} blocks`, { field: 'cut' });
  }
  const d = input.edge ? input.edge.applied : resolveClip(model, rows, bottom, defenses);
  const rng = new Rng(seed);
  const observed = input.edge ? input.edge.sent(rows, rng) : observedBottom(model, rows, bottom, d, rng);
  const nn = nearestNeighbourInversion(model, rows, observed, bottom, 64, d.noise);
  const learned = learnedInversion(model, rows, observed, bottom, d, { publicRows, seed: seed + 1 });
  const lossBatch: Batch = { ids: rows, labels: rows };
  const clean = forwardLoss(model, lossBatch, bottom, cut.top, {}, new Rng(seed + 2));
  const noisy = d.noise ? forwardLoss(model, lossBatch, bottom, cut.top, { noise: d.noise }, new Rng(seed + 2)) : clean;
  const figures: AttackFigures = {
    defenses: describeDefenses(defenses),
    bottom,
    tokenRecovery: Math.max(nn.recovery, learned.recovery),
    nearestNeighbourRecovery: nn.recovery,
    learnedRecovery: learned.recovery,
    tokensAttacked: nn.tokens,
    forwardLossCost: (noisy - clean) / clean,
  };
  if (labels) {
    const leak = labelLeakage(middleGradients(model, labels.batch, cut, d, microbatch, new Rng(seed + 3)), labels.classes);
    figures.labelLeakAucNorm = leak.aucNorm;
    figures.labelLeakAucDirection = leak.aucDirection;
  }
  return figures;
}

/** Candidates `auto` tries, weakest first. */
const AUTO_SIGMAS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.5, 2];
const AUTO_MARVELL_SCALES = [0.5, 1, 2, 4, 8];
/** The utility guard of `auto`: the largest forward loss cost it accepts. */
export const AUTO_MAX_LOSS_COST = 0.05;

/**
 * `--defense auto`: the deeper bottom of `autoDefenses` (where the model has the blocks), then
 * the weakest h_B noise that halves token recovery within a forward loss cost of 5% (where none
 * does, the strongest within that cost, and no noise when even the weakest costs more), and the
 * weakest Marvell power that brings both label AUCs to ≤ 0.6 (the strongest candidate where none does).
 */
export function chooseDefenses(input: MeasureInput, undefended: AttackFigures): { defenses: Defenses; figures: AttackFigures } {
  const deeper = autoDefenses(input.model.numLayers, input.cut).deeperBottom;
  const moved: Defenses = deeper ? { deeperBottom: deeper } : {};
  let noise: Defenses['noise'];
  for (const sigma of AUTO_SIGMAS) {
    const f = measureAttacks({ ...input, labels: undefined }, { ...moved, noise: { sigma, clip: 0 } });
    if (f.forwardLossCost > AUTO_MAX_LOSS_COST) break;
    noise = { sigma, clip: 0 };
    if (f.tokenRecovery <= undefended.tokenRecovery / 2) break;
  }
  let scale = AUTO_MARVELL_SCALES[AUTO_MARVELL_SCALES.length - 1];
  if (input.labels) {
    // With the chosen noise and bottom: the noise on h_B changes g_M and what its norm tells.
    const cut = { bottom: input.cut.bottom + (deeper ?? 0), top: input.cut.top };
    const withNoise = resolveClip(input.model, input.rows, cut.bottom, { ...(noise ? { noise } : {}) });
    for (const m of AUTO_MARVELL_SCALES) {
      const leak = labelLeakage(middleGradients(input.model, input.labels.batch, cut, { ...withNoise, marvell: { scale: m } }, input.microbatch, new Rng(input.seed + 3)), input.labels.classes);
      scale = m;
      if (leak.aucNorm <= 0.6 && leak.aucDirection <= 0.6) break;
    }
  }
  const defenses: Defenses = { ...moved, ...(noise ? { noise } : {}), marvell: { scale } };
  return { defenses, figures: measureAttacks(input, defenses) };
}

export async function runAudit(options: AuditOptions): Promise<AuditReport> {
  const rowsWanted = checkInt(options.rows ?? 8, 'rows', 1, AUDIT_LIMITS.rows);
  const seqLen = checkInt(options.seqLen ?? 16, 'seqLen', 2, AUDIT_LIMITS.seqLen);
  const labelExamples = checkInt(options.labelExamples ?? 128, 'labelExamples', 2, AUDIT_LIMITS.labelExamples);
  const microbatch = checkInt(options.microbatch ?? 8, 'microbatch', 1, AUDIT_LIMITS.microbatch);
  const requested = options.defenses === undefined || options.defenses === 'auto' ? options.defenses : checkDefenses(options.defenses);
  await initBackend({ backend: options.backend });
  const [loaded, tokenizer] = await Promise.all([loadModelFolder(options.modelDir), loadTokenizer(options.modelDir)]);
  checkTokenizerFits(tokenizer, loaded.config.vocabSize);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  try {
    const L = model.numLayers;
    const cut = options.cut ?? { bottom: 2, top: 2 };
    if (!Number.isInteger(cut.bottom) || !Number.isInteger(cut.top) || cut.bottom < 0 || cut.top < 0 || cut.bottom + cut.top >= L) {
      throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `cut (${cut.bottom}, ${cut.top}) needs B, T ≥ 0 and B + T < ${L} (a middle of at least one block)`, { field: 'cut' });
    }
    const dataset = await readDataset(options.dataFile);
    const stream = tokenStream(dataset, tokenizer);
    const rows = streamRows(stream, seqLen, rowsWanted);
    if (rows.length === 0) throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `the data has fewer than ${seqLen} tokens`, { field: 'data' });
    const publicStream = options.publicFile ? tokenStream(await readDataset(options.publicFile), tokenizer) : stream.slice(rows.length * seqLen);
    const publicRows = streamRows(publicStream, seqLen, 512);
    if (publicRows.length === 0) throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `the public text has fewer than ${seqLen} tokens`, { field: 'public' });
    const labels = labelBatch(dataset, tokenizer, labelExamples, 64);
    const input: MeasureInput = { model, rows, publicRows, labels, cut, microbatch, seed: options.seed ?? 0 };
    const undefended = measureAttacks(input, {});
    const report: AuditReport = { model: options.modelDir, data: options.dataFile, cut, undefended };
    if (requested === 'auto') {
      const chosen = chooseDefenses(input, undefended);
      report.defended = chosen.figures;
      report.autoChosen = describeDefenses(chosen.defenses);
    } else if (requested && Object.keys(requested).length > 0) {
      report.defended = measureAttacks(input, requested);
    }
    return report;
  } finally {
    model.dispose();
  }
}
