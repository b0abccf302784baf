// Training data: .jsonl files of {"text"}, {"prompt","completion"} or {"text","label"}
// records, and plain text. Records become rows of token ids and labels of one length;
// a malformed record is a typed error naming the file and the line, never skipped.
import { extname } from 'node:path';
import { ModelError } from '../errors.ts';
import { IGNORE_INDEX } from '../loss.ts';
import { Rng } from '../random.ts';
import { readModelFile } from '../safetensors.ts';

/** What the data code needs of a tokenizer (model/tokenizer.ts's Tokenizer fits). */
export interface TextTokenizer {
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
}

export type DataFormat = 'text' | 'completion' | 'label' | 'plain';

export type Example =
  | { kind: 'text'; line: number; text: string }
  | { kind: 'completion'; line: number; prompt: string; completion: string }
  | { kind: 'label'; line: number; text: string; label: string };

export interface Dataset {
  file: string;
  format: DataFormat;
  /** Records of a .jsonl file; a plain-text file is one 'text' example. */
  examples: Example[];
}

/** A sequence of token ids and the labels the loss is taken on (IGNORE_INDEX elsewhere). */
export interface Row {
  ids: number[];
  labels: number[];
}

const FORMAT_KEYS: Record<Exclude<DataFormat, 'plain'>, string[]> = {
  text: ['text'],
  completion: ['prompt', 'completion'],
  label: ['text', 'label'],
};

function dataError(file: string, line: number, message: string): ModelError {
  return new ModelError('TANDEM_DATA_INVALID', `line ${line}: ${message}`, { file, details: { line } });
}

function formatOf(record: Record<string, unknown>): Exclude<DataFormat, 'plain'> | undefined {
  if ('prompt' in record || 'completion' in record) return 'completion';
  if ('label' in record) return 'label';
  if ('text' in record) return 'text';
  return undefined;
}

/** Parses the contents of a data file; `.jsonl` (and `.json` lines) by record, anything else as plain text. */
export function parseDataset(content: string, file: string): Dataset {
  const ext = extname(file).toLowerCase();
  if (ext !== '.jsonl' && ext !== '.json') {
    if (content.trim() === '') throw new ModelError('TANDEM_DATA_EMPTY', 'the text file is empty', { file });
    return { file, format: 'plain', examples: [{ kind: 'text', line: 1, text: content }] };
  }
  let format: Exclude<DataFormat, 'plain'> | undefined;
  const examples: Example[] = [];
  const lines = content.split('\n');
  lines.forEach((raw, i) => {
    const line = i + 1;
    const text = raw.trim();
    if (text === '') return;
    let record: unknown;
    try {
      record = JSON.parse(text);
    } catch (cause) {
      throw dataError(file, line, `not valid JSON (${(cause as Error).message})`);
    }
    if (typeof record !== 'object' || record === null || Array.isArray(record)) throw dataError(file, line, 'expected a JSON object');
    const r = record as Record<string, unknown>;
    const kind = formatOf(r);
    if (!kind) throw dataError(file, line, 'expected {"text"}, {"prompt","completion"} or {"text","label"}');
    format ??= kind;
    if (kind !== format) throw dataError(file, line, `a ${kind} record in a file of ${format} records (the first record sets the format: ${FORMAT_KEYS[format].map((k) => JSON.stringify(k)).join(', ')})`);
    for (const key of FORMAT_KEYS[kind]) {
      if (typeof r[key] !== 'string') throw dataError(file, line, `${JSON.stringify(key)} must be a string, got ${r[key] === undefined ? 'nothing' : JSON.stringify(r[key])}`);
    }
    if (kind === 'text') examples.push({ kind, line, text: r.text as string });
    else if (kind === 'completion') examples.push({ kind, line, prompt: r.prompt as string, completion: r.completion as string });
    else {
      if ((r.label as string).trim() === '') throw dataError(file, line, '"label" must not be empty');
      examples.push({ kind, line, text: r.text as string, label: r.label as string });
    }
  });
  if (!format || examples.length === 0) throw new ModelError('TANDEM_DATA_EMPTY', 'the file holds no records', { file });
  return { file, format, examples };
}

/** The largest data file read: about what one JavaScript string holds (2^29 characters). */
export const MAX_DATA_FILE_BYTES = 512 * 1024 * 1024;

/**
 * Reads and parses a data file; a missing or unreadable file, one that is not a regular file (a
 * named pipe blocked the read for good) or one over MAX_DATA_FILE_BYTES is a typed error naming it.
 */
export async function readDataset(file: string): Promise<Dataset> {
  const bytes = await readModelFile(file, MAX_DATA_FILE_BYTES);
  return parseDataset(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'), file);
}

function commonPrefix(a: readonly number[], b: readonly number[]): number {
  let k = 0;
  while (k < a.length && k < b.length && a[k] === b[k]) k++;
  return k;
}

/**
 * Token ids of `prefix + suffix` with labels on the suffix only. The whole string is
 * encoded at once (tokenizers merge across the boundary) and the label boundary is where
 * it stops agreeing with the encoding of the prefix alone.
 */
function maskedRow(tokenizer: TextTokenizer, prefix: string, suffix: string, eos: boolean): Row {
  const full = tokenizer.encode(prefix + suffix, { addSpecialTokens: false });
  const k = prefix === '' ? 0 : commonPrefix(full, tokenizer.encode(prefix, { addSpecialTokens: false }));
  const bos = tokenizer.bosTokenId === undefined ? [] : [tokenizer.bosTokenId];
  const end = eos && tokenizer.eosTokenId !== undefined ? [tokenizer.eosTokenId] : [];
  const ids = [...bos, ...full, ...end];
  const labels = ids.map((id, i) => (i < bos.length + k ? IGNORE_INDEX : id));
  return { ids, labels };
}

/** `text label`: how a classification record is trained and scored (the label word after a space). */
export function labelRow(tokenizer: TextTokenizer, text: string, label: string, seqLen: number): Row {
  return keepEnd(maskedRow(tokenizer, text, ` ${label}`, false), seqLen);
}

/** Cuts a row to seqLen keeping its end (the completion or label), and its first token (bos). */
function keepEnd(row: Row, seqLen: number): Row {
  if (row.ids.length <= seqLen) return row;
  const cut = row.ids.length - seqLen + 1;
  return { ids: [row.ids[0], ...row.ids.slice(cut)], labels: [IGNORE_INDEX, ...row.labels.slice(cut)] };
}

/** Splits a row into pieces of at most seqLen tokens (long texts: nothing is dropped). */
function chunk(row: Row, seqLen: number): Row[] {
  const out: Row[] = [];
  for (let i = 0; i < row.ids.length; i += seqLen) out.push({ ids: row.ids.slice(i, i + seqLen), labels: row.labels.slice(i, i + seqLen) });
  return out.filter((r) => r.ids.length >= 2);
}

/** Rows of one example, each at most seqLen tokens. */
export function exampleRows(tokenizer: TextTokenizer, example: Example, seqLen: number): Row[] {
  switch (example.kind) {
    case 'text':
      return chunk(maskedRow(tokenizer, '', example.text, true), seqLen);
    case 'completion':
      return [keepEnd(maskedRow(tokenizer, example.prompt, example.completion, true), seqLen)];
    case 'label':
      return [labelRow(tokenizer, example.text, example.label, seqLen)];
  }
}

/** The pad id of rows: eos when the tokenizer has one, else 0 (its label is always ignored). */
export function padId(tokenizer: TextTokenizer): number {
  return tokenizer.eosTokenId ?? 0;
}

/** Pads a row to `length` with pad ids and ignored labels. */
export function padRow(row: Row, length: number, pad: number): Row {
  const n = length - row.ids.length;
  if (n <= 0) return row;
  return { ids: [...row.ids, ...new Array<number>(n).fill(pad)], labels: [...row.labels, ...new Array<number>(n).fill(IGNORE_INDEX)] };
}

/**
 * Packs rows into rows of seqLen: each sequence starts with its own bos, sequences follow
 * one another, and one that does not fit opens the next row (so no completion is split).
 * The rest of a row is padding that the loss ignores.
 */
export function packRows(rows: readonly Row[], seqLen: number, pad: number): Row[] {
  const out: Row[] = [];
  let ids: number[] = [];
  let labels: number[] = [];
  for (const row of rows) {
    if (ids.length + row.ids.length > seqLen && ids.length > 0) {
      out.push(padRow({ ids, labels }, seqLen, pad));
      ids = [];
      labels = [];
    }
    ids.push(...row.ids);
    labels.push(...row.labels);
  }
  if (ids.length > 0) out.push(padRow({ ids, labels }, seqLen, pad));
  return out;
}

export interface PrepareOptions {
  seqLen: number;
  /** Fraction of examples (of chunks, for plain text) held out for validation. */
  valFraction: number;
  seed: number;
  /** Pack short sequences together (default true; label data is never packed). */
  pack?: boolean;
}

export interface PreparedData {
  format: DataFormat;
  train: Row[];
  validation: Row[];
  /** Classification data: the candidate labels and the held-out records to score. */
  classification?: { labels: string[]; validation: { text: string; label: string }[] };
}

/** Splits examples into train and validation by a seeded shuffle; the validation set is never empty when there are 2+ examples and the fraction is > 0. */
export function splitExamples<T>(items: readonly T[], valFraction: number, seed: number): { train: T[]; validation: T[] } {
  if (!(valFraction >= 0 && valFraction < 1)) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `validation fraction must be in [0, 1), got ${valFraction}`, { field: 'val_fraction' });
  const shuffled = new Rng(seed).shuffle([...items]);
  const n = valFraction === 0 || items.length < 2 ? 0 : Math.max(1, Math.round(items.length * valFraction));
  return { train: shuffled.slice(n), validation: shuffled.slice(0, n) };
}

/** Tokenizes, splits and packs a dataset into rows of exactly seqLen tokens. */
export function prepareData(dataset: Dataset, tokenizer: TextTokenizer, options: PrepareOptions): PreparedData {
  const { seqLen, seed } = options;
  if (!Number.isInteger(seqLen) || seqLen < 2) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `sequence length must be an integer ≥ 2, got ${seqLen}`, { field: 'seq_len' });
  const pad = padId(tokenizer);
  const finish = (rows: Row[], pack: boolean) => (pack ? packRows(rows, seqLen, pad) : rows.map((r) => padRow(r, seqLen, pad)));
  let result: PreparedData;
  if (dataset.format === 'plain') {
    const chunks = dataset.examples.flatMap((e) => exampleRows(tokenizer, e, seqLen));
    const { train, validation } = splitExamples(chunks, options.valFraction, seed);
    result = { format: 'plain', train: finish(train, false), validation: finish(validation, false) };
  } else {
    const { train, validation } = splitExamples(dataset.examples, options.valFraction, seed);
    const pack = dataset.format !== 'label' && (options.pack ?? true);
    const rows = (examples: Example[]) => examples.flatMap((e) => exampleRows(tokenizer, e, seqLen));
    result = { format: dataset.format, train: finish(rows(train), pack), validation: finish(rows(validation), pack) };
    if (dataset.format === 'label') {
      const labels = [...new Set(dataset.examples.map((e) => (e.kind === 'label' ? e.label : '')))].sort();
      result.classification = { labels, validation: validation.map((e) => (e.kind === 'label' ? { text: e.text, label: e.label } : { text: '', label: '' })) };
    }
  }
  if (result.train.length === 0) throw new ModelError('TANDEM_DATA_EMPTY', 'no training rows after tokenization', { file: dataset.file });
  return result;
}

/** Where a BatchStream stands, for checkpoints. */
export interface BatchStreamState {
  epoch: number;
  /** Rows of this epoch's order already handed out. */
  position: number;
  /** The generator's state before it shuffled this epoch. */
  epochRng: number[];
}

/**
 * Rows in a seeded order, reshuffled every epoch, in batches of `batchSize`; an epoch's
 * last partial batch is dropped unless it is the only batch. Saving state() and
 * resuming from it hands out exactly the batches the uninterrupted stream would have.
 */
export class BatchStream {
  private rng: Rng;
  private order: number[] = [];
  private epochRng: number[] = [];
  epoch = 0;
  position = 0;

  constructor(
    private readonly rows: readonly Row[],
    readonly batchSize: number,
    seed: number,
    state?: BatchStreamState,
  ) {
    if (!Number.isInteger(batchSize) || batchSize < 1) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `batch size must be a positive integer, got ${batchSize}`, { field: 'batch_size' });
    if (rows.length === 0) throw new ModelError('TANDEM_DATA_EMPTY', 'no rows to batch', { field: 'rows' });
    if (state) {
      this.rng = Rng.fromState(state.epochRng);
      this.shuffle();
      this.epoch = state.epoch;
      this.position = state.position;
    } else {
      this.rng = new Rng(seed);
      this.shuffle();
    }
  }

  private shuffle(): void {
    this.epochRng = this.rng.state();
    this.order = this.rng.shuffle(this.rows.map((_, i) => i));
    this.position = 0;
  }

  next(): { ids: number[][]; labels: number[][] } {
    const size = Math.min(this.batchSize, this.rows.length);
    if (this.position + size > this.order.length) {
      this.shuffle();
      this.epoch += 1;
    }
    const picked = this.order.slice(this.position, this.position + size).map((i) => this.rows[i]);
    this.position += size;
    return { ids: picked.map((r) => [...r.ids]), labels: picked.map((r) => [...r.labels]) };
  }

  state(): BatchStreamState {
    return { epoch: this.epoch, position: this.position, epochRng: [...this.epochRng] };
  }
}
