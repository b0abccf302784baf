// Plugs a tenant's adapter into the served model and evaluates it on data the tenant sent.
// The node runs this in a worker thread of its own (adapter-evaluator.ts), on a copy of the
// model loaded there; its thread only checks the files first (checkAdapterFiles). The adapter is loaded onto a view of the served model that shares its weights, except
// those the adapter changes in place (whole blocks, biases), which the view holds as
// copies: the served model and the sessions running on it never see the adapter. Nothing
// is kept after the call: the adapter's files live in a temporary folder removed before
// returning, and the data only in memory.
//
// What loading allocates is bounded before anything is allocated: adapter_config.json's size,
// and every size it states (LoRA/VeRA rank, virtual tokens, bottleneck size, token dim) is
// capped and must be a dimension of a tensor in the weights sent; then model/peft's planAdapter
// checks each size against the model and the bytes the adapter's tensors would take against
// MAX_ADAPTER_ALLOCATION_BYTES, and checkAdapterWeights the tensors sent against those declared.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MAX_ADAPTER_TENSORS, LlamaModel, baseNameOfKey, checkAdapterWeights, ModelError, evaluateClassification, evaluateRows, loadAdapter, localScorer, parseDataset, parseSafetensors, planAdapter, prepareData, tf,
} from '../model/index.ts';
import type { PeftAdapter, Tokenizer } from '../model/index.ts';
import type { AdapterEvaluation, LmFigures } from '../protocol/index.ts';
import { CloudError, resourceErrorOf } from './errors.ts';
import type { ServedModel } from './served-model.ts';

export interface AdapterFiles {
  /** adapter_config.json as text. */
  config: string;
  /** adapter_model.safetensors bytes. */
  weights: Uint8Array;
}

export interface EvaluationData {
  /** The file name it came from: `.jsonl` is read by record, anything else as plain text. */
  name: string;
  text: string;
}

export const MAX_ADAPTER_CONFIG_BYTES = 64 * 1024;
/** Bytes a tenant's adapter may make loading allocate (model/peft's estimate: its tensors in float32). */
export const MAX_ADAPTER_ALLOCATION_BYTES = 512 * 1024 * 1024;
/** adapter_config.json fields that size what loading allocates. */
const SIZE_FIELDS = ['r', 'num_virtual_tokens', 'bottleneck_size', 'token_dim'];

/** What an evaluation needs of the served model: the node's ServedModel, or the worker's copy of it. */
export type EvaluationBase = Pick<ServedModel, 'id' | 'config' | 'model'>;

/** The message without the temporary folder the adapter was written to. */
function scrubbed(message: string, dir: string | undefined): string {
  let out = message;
  if (dir !== undefined) out = out.split(`${dir}/`).join('').split(dir).join('<adapter>');
  return out.split(tmpdir()).join('<tmp>');
}

function invalidAdapter(served: EvaluationBase, err: unknown, dir?: string): CloudError {
  const reason = scrubbed(err instanceof Error ? err.message : String(err), dir);
  return new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason }, { cause: err });
}

interface StatedSize {
  field: string;
  value: number;
}

/** The sizes a config states, in its top level, a composite's methods and LoRA's rank_pattern. */
function statedSizes(json: unknown, at: string, depth = 0): StatedSize[] {
  if (depth > 3 || json === null || typeof json !== 'object') return [];
  const out: StatedSize[] = [];
  const obj = json as Record<string, unknown>;
  for (const field of SIZE_FIELDS) if (typeof obj[field] === 'number') out.push({ field: `${at}${field}`, value: obj[field] });
  const pattern = obj.rank_pattern;
  if (pattern !== null && typeof pattern === 'object' && !Array.isArray(pattern)) {
    for (const [name, v] of Object.entries(pattern as Record<string, unknown>)) if (typeof v === 'number') out.push({ field: `${at}rank_pattern[${JSON.stringify(name).slice(0, 80)}]`, value: v });
  }
  if (Array.isArray(obj.methods)) obj.methods.slice(0, 16).forEach((m, i) => out.push(...statedSizes(m, `${at}methods[${i}].`, depth + 1)));
  return out;
}

/**
 * The cloud's answer to a ModelError of planning or loading an adapter: a size over its limit
 * (a rank above the widest module it targets, the tensors' bytes over the allocation limit) is
 * TANDEM_ADAPTER_TOO_LARGE naming the field, the value and the limit; anything else the model
 * refuses is TANDEM_ADAPTER_INVALID. Other errors are returned as they are.
 */
export function adapterErrorOf(served: EvaluationBase, err: unknown, scrub: (message: string) => string = (m) => m): unknown {
  if (!(err instanceof ModelError)) return err;
  const { actual, limit } = err.details as { actual?: unknown; limit?: unknown };
  if (typeof actual === 'number' && typeof limit === 'number' && (err.code === 'TANDEM_ADAPTER_TOO_LARGE' || err.code === 'TANDEM_PEFT_CONFIG_INVALID')) {
    const field = err.code === 'TANDEM_ADAPTER_TOO_LARGE' ? 'the sizes stated together' : (err.field ?? 'a size');
    return new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field, actual: err.code === 'TANDEM_ADAPTER_TOO_LARGE' ? `about ${actual} bytes to allocate` : actual, limit }, { cause: err });
  }
  return new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: scrub(err.message) }, { cause: err });
}

/**
 * Refuses, before anything is written or allocated, an adapter whose stated sizes the weights
 * sent do not justify, whose sizes exceed what the served model allows, whose tensors would
 * take more than `maxAllocationBytes`, or whose weights lack a tensor it declares (or have
 * another shape). `weights` is the parsed safetensors file: its header is what is compared.
 */
export function checkAdapterCost(served: EvaluationBase, json: unknown, weights: { metadata: Record<string, string>; tensors: ReadonlyMap<string, { shape: number[] }> }, maxAllocationBytes = MAX_ADAPTER_ALLOCATION_BYTES): void {
  const { hiddenSize, intermediateSize } = served.config;
  const maxSize = 4 * Math.max(hiddenSize, intermediateSize);
  const dims = new Set([...weights.tensors.values()].flatMap((t) => t.shape));
  for (const { field, value } of statedSizes(json, '')) {
    if (!Number.isSafeInteger(value) || value < 1) continue; // the method's own validation names it
    if (value > maxSize) throw new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field, actual: value, limit: `${maxSize} (4 x the model's largest width)` });
    if (!dims.has(value)) {
      throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: `${ADAPTER_CONFIG_FILE} states ${field} = ${value}, which is no dimension of any tensor in ${ADAPTER_WEIGHTS_FILE}` });
    }
  }
  try {
    const { plan } = planAdapter(served.model, json, { metadata: weights.metadata, maxAllocationBytes });
    checkAdapterWeights(plan, weights.tensors, ADAPTER_WEIGHTS_FILE);
  } catch (err) {
    throw adapterErrorOf(served, err);
  }
}

/** A model sharing the served weights except `copied`, which it holds as its own variables. */
function viewOf(served: EvaluationBase, copied: Set<string>): LlamaModel {
  const weights = new Map(served.model.weights);
  for (const name of copied) weights.set(name, tf.variable(served.model.weight(name), false));
  return new LlamaModel(served.config, weights);
}

/** Frees what the view owns (its copies and tables), never the shared weights. */
function disposeView(view: LlamaModel, served: EvaluationBase, copied: Set<string>): void {
  for (const name of [...view.weights.keys()]) if (!copied.has(name) && view.weights.get(name) === served.model.weights.get(name)) view.weights.delete(name);
  view.dispose();
}

async function lmFigures(model: LlamaModel, adapter: PeftAdapter | undefined, rows: Parameters<typeof evaluateRows>[1], batchSize: number, labels: { tokenizer: Tokenizer; records: { text: string; label: string }[]; labels: string[]; seqLen: number } | undefined): Promise<LmFigures> {
  const scorer = localScorer(model, adapter);
  const lm = await evaluateRows(scorer, rows, batchSize);
  const accuracy = labels ? (await evaluateClassification(scorer, labels.tokenizer, labels.records, labels.labels, labels.seqLen)).accuracy : undefined;
  return { loss: lm.loss, perplexity: lm.perplexity, tokens: lm.tokens, ...(accuracy === undefined ? {} : { accuracy }) };
}

/** What checkAdapterFiles read of an adapter's two files. */
export interface CheckedAdapter {
  contents: ReturnType<typeof parseSafetensors>;
  json: unknown;
  peftType: string;
}

/**
 * The checks of an adapter's files that cost only their header: adapter_config.json's size and
 * syntax, the safetensors layout, and checkAdapterCost. The node runs them on its own thread
 * before an evaluation is queued, so that a refused adapter waits for none.
 */
export function checkAdapterFiles(served: EvaluationBase, files: AdapterFiles): CheckedAdapter {
  const configBytes = Buffer.byteLength(files.config, 'utf8');
  if (configBytes > MAX_ADAPTER_CONFIG_BYTES) throw new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field: `${ADAPTER_CONFIG_FILE} bytes`, actual: configBytes, limit: MAX_ADAPTER_CONFIG_BYTES });
  let contents: ReturnType<typeof parseSafetensors>;
  try {
    contents = parseSafetensors(files.weights, ADAPTER_WEIGHTS_FILE, { maxTensors: MAX_ADAPTER_TENSORS });
  } catch (err) {
    throw invalidAdapter(served, err);
  }
  let json: { peft_type?: unknown } | null;
  try {
    json = JSON.parse(files.config) as { peft_type?: unknown } | null;
  } catch (err) {
    throw invalidAdapter(served, new Error(`${ADAPTER_CONFIG_FILE} is not valid JSON: ${(err as Error).message}`));
  }
  checkAdapterCost(served, json, contents);
  const peftType = json !== null && typeof json === 'object' && typeof json.peft_type === 'string' ? json.peft_type : 'unknown';
  return { contents, json, peftType };
}

/** What one call through the model counts as, at the least, against EvaluationOptions.maxTokens. */
export const EVAL_MIN_TOKENS_PER_CALL = 128;

export interface EvaluationOptions {
  seqLen: number;
  batchSize: number;
  /**
   * Tokens the evaluation may run through the model, plug-in and baseline together (rows x
   * seqLen, and for label data records x labels x seqLen): counted after tokenizing, before
   * any compute. Unbounded when not given.
   */
  maxTokens?: number;
}

export async function evaluateAdapter(served: EvaluationBase, tokenizer: Tokenizer, files: AdapterFiles, data: EvaluationData, options: EvaluationOptions): Promise<AdapterEvaluation> {
  const { contents, peftType } = checkAdapterFiles(served, files);
  const keys = [...contents.tensors.keys()];
  let prepared: ReturnType<typeof prepareData>;
  let dataset: ReturnType<typeof parseDataset>;
  try {
    dataset = parseDataset(data.text, data.name);
    prepared = prepareData(dataset, tokenizer, { seqLen: options.seqLen, valFraction: 0, seed: 0, pack: false });
  } catch (err) {
    if (err instanceof ModelError) throw new CloudError('TANDEM_EVAL_DATA_INVALID', { reason: err.message }, { cause: err });
    throw err;
  }
  const records = dataset.examples.flatMap((e) => (e.kind === 'label' ? [{ text: e.text, label: e.label }] : []));
  const labels = prepared.classification ? { tokenizer, records, labels: prepared.classification.labels, seqLen: options.seqLen } : undefined;
  // A call through the model counts as at least EVAL_MIN_TOKENS_PER_CALL tokens: with seqLen 2 and
  // batchSize 1, 3 KB of text took 10 s of calls (0.6 s at batchSize 64), so the token count alone
  // let one request hold the evaluator for its whole timeout.
  const calls = Math.ceil(prepared.train.length / options.batchSize) + (labels === undefined ? 0 : records.length);
  const scored = 2 * Math.max(options.seqLen * (prepared.train.length + (labels === undefined ? 0 : records.length * labels.labels.length)), calls * EVAL_MIN_TOKENS_PER_CALL);
  if (options.maxTokens !== undefined && scored > options.maxTokens) {
    throw new CloudError('TANDEM_EVAL_DATA_INVALID', { reason: `it makes ${scored} tokens to run through the model (plug-in and baseline, ${prepared.train.length} rows${labels === undefined ? '' : ` and ${records.length} records x ${labels.labels.length} labels`} of ${options.seqLen}, in ${calls} calls of at least ${EVAL_MIN_TOKENS_PER_CALL} tokens each); the limit is ${options.maxTokens}: send less data, or a larger batchSize` });
  }
  // Base weights the adapter's file names (block, bitfit) are changed in place: copy them.
  const copied = new Set(keys.map(baseNameOfKey).filter((n) => served.model.weights.has(n)));
  const dir = await mkdtemp(join(tmpdir(), 'tandem-adapter-eval-'));
  const view = viewOf(served, copied);
  let adapter: PeftAdapter | undefined;
  try {
    await writeFile(join(dir, ADAPTER_CONFIG_FILE), files.config);
    await writeFile(join(dir, ADAPTER_WEIGHTS_FILE), files.weights);
    try {
      adapter = await loadAdapter(view, dir, { maxAllocationBytes: MAX_ADAPTER_ALLOCATION_BYTES });
    } catch (err) {
      throw adapterErrorOf(served, err, (m) => scrubbed(m, dir));
    }
    await rm(dir, { recursive: true, force: true });
    const plugIn = await lmFigures(view, adapter, prepared.train, options.batchSize, labels);
    const baseline = await lmFigures(served.model, undefined, prepared.train, options.batchSize, labels);
    return { plugIn, baseline, examples: dataset.examples.length, peftType, adapterTensors: keys.length };
  } catch (err) {
    throw resourceErrorOf(err, 'memory') ?? err;
  } finally {
    adapter?.dispose();
    disposeView(view, served, copied);
    await rm(dir, { recursive: true, force: true });
  }
}
