// `tandem edge upload`: the plug-in evaluation of an offsite adapter in split mode (the data
// and the adapter stay on the edge; the cloud runs the full middle on hidden states); and the
// download of emulator bundles.
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { batchTensors, checkRecipeFitsModel, evaluateClassification, evaluateRows, loadAdapter, prepareData, readAdapterConfig, readDataset, scoreLogits, tf } from '../model/index.ts';
import type { Cut, LlamaModel, Middle, PeftAdapter, PreparedData, Scorer, Tokenizer } from '../model/index.ts';
import { MANIFEST_FILE, parseManifest, readBundle, readOffsiteRecord, writeBundleFiles } from '../emulator/index.ts';
import type { Bundle, BundleManifest, Quantization } from '../emulator/index.ts';
import type { LmFigures, PlugInEvaluation } from '../protocol/index.ts';
import { readJson } from './reply-body.ts';
import { call, cloudUrl } from './cloud-call.ts';
import type { CloudTarget } from './cloud-call.ts';
import { checkListedSha256, loadEdgePart, parseFileEntries, readDeclaredFile } from './download.ts';
import type { LoadedEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import { connectCloud } from './session.ts';

export interface UploadOptions extends CloudTarget {
  /** The adapter folder `tandem edge offsite` wrote (with tandem_offsite.json). */
  adapterDir: string;
  /** Evaluation data (.jsonl or plain text); it never leaves this machine. */
  dataFile: string;
  /** The model's id on the node; tandem_offsite.json's by default. */
  modelId?: string;
  seqLen?: number;
  batchSize?: number;
  cacheDir?: string;
  requestTimeoutMs?: number;
}

const sha = (h: string) => h.replace(/^sha256:/, '');


/**
 * Forward-only scoring in split mode: bottom and top (with the adapter's hooks) here, the
 * middle on the cloud, which sees h_B and nothing else. Every call takes a new micro-batch
 * number, so no two batches of the session share a key.
 */
function splitScorer(model: LlamaModel, cut: Cut, middle: Middle, next: () => number, adapter?: PeftAdapter): Scorer {
  const L = model.numLayers;
  const hooks = adapter?.hooks;
  return {
    async score(batch) {
      const { ids, labels } = batchTensors(batch);
      const hB = tf.tidy(() => {
        const h = model.embed(ids, { hooks });
        return cut.bottom > 0 ? model.blocks(h, 0, cut.bottom, { hooks, positionOffset: 0 }) : h;
      });
      let hM: tf.Tensor3D;
      try {
        hM = await middle.forward(hB, { step: 0, microbatch: next(), eval: true }, false);
      } finally {
        hB.dispose();
      }
      try {
        const logits = tf.tidy(() => model.head(cut.top > 0 ? model.blocks(hM, L - cut.top, L, { hooks, positionOffset: 0 }) : hM, adapter?.numVirtualTokens ?? 0));
        try {
          return scoreLogits(logits, labels, batch.labels);
        } finally {
          logits.dispose();
        }
      } finally {
        tf.dispose([hM, ids, labels]);
      }
    },
  };
}

async function figures(scorer: Scorer, rows: PreparedData['train'], batchSize: number, labels: { tokenizer: Tokenizer; records: { text: string; label: string }[]; labels: string[]; seqLen: number } | undefined): Promise<LmFigures> {
  const lm = await evaluateRows(scorer, rows, batchSize);
  const accuracy = labels ? (await evaluateClassification(scorer, labels.tokenizer, labels.records, labels.labels, labels.seqLen)).accuracy : undefined;
  return { ...lm, ...(accuracy === undefined ? {} : { accuracy }) };
}

/**
 * The plug-in evaluation of an offsite adapter, with no text, token ids or labels sent: the
 * edge downloads its part of the full model at the adapter's cut, plugs the adapter into it
 * and evaluates in split mode through the cloud's full middle (the base alone first, then
 * with the adapter). The adapter stays on the edge too.
 */
export async function uploadAdapter(options: UploadOptions): Promise<PlugInEvaluation> {
  const record = await readOffsiteRecord(options.adapterDir);
  const config = await readAdapterConfig(options.adapterDir);
  const seqLen = options.seqLen ?? 256;
  const batchSize = options.batchSize ?? 8;
  const dataset = await readDataset(options.dataFile);
  const modelId = options.modelId ?? record.baseModel.id;
  const client = await connectCloud(options.cloudUrl, { key: options.key, ca: options.ca, requestTimeoutMs: options.requestTimeoutMs });
  let edge: LoadedEdgePart | undefined;
  let adapter: PeftAdapter | undefined;
  try {
    const info = (await client.models()).find((m) => m.id === modelId);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(modelId)}`, { field: 'model' });
    if (sha(info.contentHash) !== sha(record.baseModel.contentHash)) {
      throw new EdgeError('TANDEM_EDGE_ADAPTER_BASE_MISMATCH', `the adapter was trained against ${record.baseModel.contentHash}, the cloud serves ${info.contentHash}`, { where: options.adapterDir, field: 'baseModel.contentHash' });
    }
    edge = await loadEdgePart(await client.downloadEdge(info.id, record.cut, options.cacheDir));
    checkRecipeFitsModel({ seqLen }, edge.config);
    const prepared = prepareData(dataset, edge.tokenizer, { seqLen, valFraction: 0, seed: 0, pack: false });
    const records = dataset.examples.flatMap((e) => (e.kind === 'label' ? [{ text: e.text, label: e.label }] : []));
    const labels = prepared.classification ? { tokenizer: edge.tokenizer, records, labels: prepared.classification.labels, seqLen } : undefined;
    const session = await client.openSession({ model: { id: info.id, contentHash: edge.contentHash }, cut: record.cut, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] }, methods: [] });
    const middle = session.middle();
    let microbatch = 0;
    const next = () => microbatch++;
    try {
      // The base first: block and BitFit adapters load into the edge's base weights.
      const baseline = await figures(splitScorer(edge.model, record.cut, middle, next), prepared.train, batchSize, labels);
      adapter = await loadAdapter(edge.model, options.adapterDir);
      checkRecipeFitsModel({ seqLen }, edge.config, adapter.numVirtualTokens);
      const plugIn = await figures(splitScorer(edge.model, record.cut, middle, next, adapter), prepared.train, batchSize, labels);
      await session.close('completed');
      return { model: info.id, contentHash: info.contentHash, plugIn, baseline, examples: dataset.examples.length, peftType: typeof config.peft_type === 'string' ? config.peft_type : 'unknown', adapterTensors: adapterTensorCount(adapter) };
    } finally {
      middle.dispose();
    }
  } finally {
    adapter?.dispose();
    edge?.model.dispose();
    client.close();
  }
}

function adapterTensorCount(adapter: PeftAdapter): number {
  return adapter.state().size;
}

export interface DownloadBundleOptions extends CloudTarget {
  modelId: string;
  keep: number;
  bottom?: number;
  top?: number;
  quantize?: Quantization;
  outDir: string;
}

/**
 * Downloads an emulator bundle into `outDir` and verifies it (every file's sha256 and the bundle
 * checksum). No file is read past the bytes the listing declares for it, each is checked against
 * the listing's sha256 as it arrives, the listing must name exactly the bundle manifest's files,
 * and the bundle is verified whole in a folder of its own before any file of `outDir` is
 * replaced: a file the manifest does not list (a Makefile) or a corrupt one never reaches it.
 */
export async function downloadBundle(options: DownloadBundleOptions): Promise<Bundle> {
  const query = new URLSearchParams({ keep: String(options.keep) });
  if (options.bottom !== undefined) query.set('bottom', String(options.bottom));
  if (options.top !== undefined) query.set('top', String(options.top));
  if (options.quantize !== undefined) query.set('quantize', options.quantize);
  const base = `/v1/models/${encodeURIComponent(options.modelId)}/emulators`;
  const where = cloudUrl(options, `${base}?${query}`);
  const body = await readJson(await call(options, 'GET', `${base}?${query}`), where);
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'expected {model, contentHash, cut, manifest, files: [...]}', { where });
  const listing = parseFileEntries((body as { files?: unknown }).files, where);
  const fetchFile = async (f: (typeof listing)[number]): Promise<Uint8Array> => {
    const res = await call(options, 'GET', `${base}/files/${encodeURIComponent(f.name)}?${query}`);
    const fileWhere = `${options.cloudUrl} file ${f.name}`;
    return checkListedSha256(await readDeclaredFile(res, f, fileWhere), f, fileWhere);
  };
  // The manifest first: the listing must name exactly its files, and nothing else is fetched.
  const manifestEntry = listing.find((f) => f.name === MANIFEST_FILE);
  if (manifestEntry === undefined) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the listing names no ${MANIFEST_FILE}`, { where });
  const manifestBytes = await fetchFile(manifestEntry);
  let manifest: BundleManifest;
  try {
    manifest = parseManifest(JSON.parse(Buffer.from(manifestBytes).toString('utf8')), `${options.cloudUrl} file ${MANIFEST_FILE}`);
  } catch (cause) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the bundle's ${MANIFEST_FILE} is not one: ${(cause as Error).message}`, { where, cause });
  }
  const bundled = [...manifest.files.map((f) => f.name), MANIFEST_FILE].sort();
  const listed = listing.map((f) => f.name).sort();
  if (bundled.join('\n') !== listed.join('\n')) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the listing names ${listed.join(', ')}; the bundle's manifest ${bundled.join(', ')}`, { where });
  }
  const files = new Map<string, Uint8Array>([[MANIFEST_FILE, manifestBytes]]);
  for (const f of listing) if (f.name !== MANIFEST_FILE) files.set(f.name, await fetchFile(f));
  const staging = `${options.outDir.replace(/[\\/]+$/, '')}.download-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeBundleFiles(staging, files);
    await readBundle(staging);
    await mkdir(options.outDir, { recursive: true });
    // The manifest last, as writeBundleFiles does: a folder with a manifest is complete.
    for (const name of [...listed.filter((n) => n !== MANIFEST_FILE), MANIFEST_FILE]) await rename(join(staging, name), join(options.outDir, name));
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
  return readBundle(options.outDir);
}
