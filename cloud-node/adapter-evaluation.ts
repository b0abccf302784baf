// Plugs a tenant's adapter into the served model and evaluates it on data the tenant sent.
// The adapter is loaded onto a view of the served model that shares its weights, except
// those the adapter changes in place (whole blocks, biases), which the view holds as
// copies: the served model and the sessions running on it never see the adapter. Nothing
// is kept after the call: the adapter's files live in a temporary folder removed before
// returning, and the data only in memory.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LlamaModel, baseNameOfKey, ModelError, evaluateClassification, evaluateRows, loadAdapter, localScorer, parseDataset, parseSafetensors, prepareData, tf,
} from '../model/index.ts';
import type { PeftAdapter, Tokenizer } from '../model/index.ts';
import type { AdapterEvaluation, LmFigures } from '../protocol/index.ts';
import { CloudError } from './errors.ts';
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


function invalidAdapter(served: ServedModel, err: unknown): CloudError {
  const reason = err instanceof Error ? err.message : String(err);
  return new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason }, { cause: err });
}

/** A model sharing the served weights except `copied`, which it holds as its own variables. */
function viewOf(served: ServedModel, copied: Set<string>): LlamaModel {
  const weights = new Map(served.model.weights);
  for (const name of copied) weights.set(name, tf.variable(served.model.weight(name), false));
  return new LlamaModel(served.config, weights);
}

/** Frees what the view owns (its copies and tables), never the shared weights. */
function disposeView(view: LlamaModel, served: ServedModel, copied: Set<string>): void {
  for (const name of [...view.weights.keys()]) if (!copied.has(name) && view.weights.get(name) === served.model.weights.get(name)) view.weights.delete(name);
  view.dispose();
}

async function lmFigures(model: LlamaModel, adapter: PeftAdapter | undefined, rows: Parameters<typeof evaluateRows>[1], batchSize: number, labels: { tokenizer: Tokenizer; records: { text: string; label: string }[]; labels: string[]; seqLen: number } | undefined): Promise<LmFigures> {
  const scorer = localScorer(model, adapter);
  const lm = await evaluateRows(scorer, rows, batchSize);
  const accuracy = labels ? (await evaluateClassification(scorer, labels.tokenizer, labels.records, labels.labels, labels.seqLen)).accuracy : undefined;
  return { loss: lm.loss, perplexity: lm.perplexity, tokens: lm.tokens, ...(accuracy === undefined ? {} : { accuracy }) };
}

export async function evaluateAdapter(served: ServedModel, tokenizer: Tokenizer, files: AdapterFiles, data: EvaluationData, options: { seqLen: number; batchSize: number }): Promise<AdapterEvaluation> {
  let keys: string[];
  try {
    keys = [...parseSafetensors(files.weights, ADAPTER_WEIGHTS_FILE).tensors.keys()];
  } catch (err) {
    throw invalidAdapter(served, err);
  }
  let peftType = 'unknown';
  try {
    const json = JSON.parse(files.config) as { peft_type?: unknown };
    if (typeof json.peft_type === 'string') peftType = json.peft_type;
  } catch (err) {
    throw invalidAdapter(served, new Error(`${ADAPTER_CONFIG_FILE} is not valid JSON: ${(err as Error).message}`));
  }
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
  // Base weights the adapter's file names (block, bitfit) are changed in place: copy them.
  const copied = new Set(keys.map(baseNameOfKey).filter((n) => served.model.weights.has(n)));
  const dir = await mkdtemp(join(tmpdir(), 'tandem-adapter-eval-'));
  const view = viewOf(served, copied);
  let adapter: PeftAdapter | undefined;
  try {
    await writeFile(join(dir, ADAPTER_CONFIG_FILE), files.config);
    await writeFile(join(dir, ADAPTER_WEIGHTS_FILE), files.weights);
    try {
      adapter = await loadAdapter(view, dir);
    } catch (err) {
      if (err instanceof ModelError) throw invalidAdapter(served, err);
      throw err;
    }
    await rm(dir, { recursive: true, force: true });
    const plugIn = await lmFigures(view, adapter, prepared.train, options.batchSize, labels);
    const baseline = await lmFigures(served.model, undefined, prepared.train, options.batchSize, labels);
    return { plugIn, baseline, examples: dataset.examples.length, peftType, adapterTensors: keys.length };
  } finally {
    adapter?.dispose();
    disposeView(view, served, copied);
    await rm(dir, { recursive: true, force: true });
  }
}
