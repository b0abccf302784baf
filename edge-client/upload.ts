// `tandem edge upload`: sends an offsite adapter to the cloud, which plugs it into the full
// model and evaluates it on the data sent with it; and the download of emulator bundles.
import { readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE } from '../model/index.ts';
import { readBundle, readOffsiteRecord, writeBundleFiles } from '../emulator/index.ts';
import type { Bundle, BundleFile, Quantization } from '../emulator/index.ts';
import type { PlugInEvaluation } from '../protocol/index.ts';
import { cloudFetch } from './download.ts';
import { EdgeError } from './errors.ts';

export interface CloudTarget {
  /** http(s)://host:port of the node. */
  cloudUrl: string;
  key: string;
  /** PEM CA certificate(s) for an https:// cloud with a private CA. */
  ca?: string;
}

async function call(target: CloudTarget, method: string, path: string, body?: unknown): Promise<Response> {
  const url = `${target.cloudUrl.replace(/\/+$/, '')}${path}`;
  let response: Response;
  try {
    response = await cloudFetch(url, {
      method,
      headers: { authorization: `Bearer ${target.key}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      timeoutMs: 30 * 60_000,
      ca: target.ca,
    });
  } catch (cause) {
    if (cause instanceof EdgeError) throw cause;
    throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `${method} failed: ${(cause as Error).message}`, { where: url, cause });
  }
  if (response.ok) return response;
  const text = await response.text().catch(() => '');
  let remoteCode: string | undefined;
  let message = text.slice(0, 200);
  try {
    const json = JSON.parse(text) as { code?: unknown; message?: unknown };
    if (typeof json.code === 'string') remoteCode = json.code;
    if (typeof json.message === 'string') message = json.message;
  } catch {
    // not JSON: the status says enough
  }
  const details = { status: response.status };
  if (response.status === 401 || response.status === 403) throw new EdgeError('TANDEM_EDGE_AUTH_FAILED', `the cloud answered ${response.status}: ${message}`, { where: url, remoteCode, details });
  // A refusal keeps the cloud's stable code (TANDEM_ADAPTER_BASE_MISMATCH, TANDEM_EMULATOR_KEEP_INVALID, ...).
  if (remoteCode !== undefined) throw new EdgeError('TANDEM_EDGE_REMOTE_ERROR', `the cloud answered ${response.status}: ${message}`, { where: url, remoteCode, details });
  throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `the cloud answered ${response.status}: ${message}`, { where: url, details });
}

export interface UploadOptions extends CloudTarget {
  /** The adapter folder `tandem edge offsite` wrote (with tandem_offsite.json). */
  adapterDir: string;
  /** Evaluation data (.jsonl or plain text), sent with the adapter and not stored by the cloud. */
  dataFile: string;
  /** The model's id on the node; tandem_offsite.json's by default. */
  modelId?: string;
  seqLen?: number;
  batchSize?: number;
}

/** Sends the adapter, the base content hash it was trained against and the data; returns the cloud's evaluation. */
export async function uploadAdapter(options: UploadOptions): Promise<PlugInEvaluation> {
  const record = await readOffsiteRecord(options.adapterDir);
  const config = await readFile(join(options.adapterDir, ADAPTER_CONFIG_FILE), 'utf8');
  const weights = await readFile(join(options.adapterDir, ADAPTER_WEIGHTS_FILE));
  const text = await readFile(options.dataFile, 'utf8');
  const model = options.modelId ?? record.baseModel.id;
  const response = await call(options, 'POST', `/v1/models/${encodeURIComponent(model)}/adapters/evaluate`, {
    baseContentHash: record.baseModel.contentHash,
    adapter: { config, weights: weights.toString('base64') },
    data: { name: basename(options.dataFile), text },
    ...(options.seqLen === undefined ? {} : { seqLen: options.seqLen }),
    ...(options.batchSize === undefined ? {} : { batchSize: options.batchSize }),
  });
  const json = (await response.json()) as PlugInEvaluation;
  if (typeof json?.plugIn?.loss !== 'number' || typeof json?.baseline?.loss !== 'number') throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the evaluation reply has no plugIn and baseline figures', { where: options.cloudUrl });
  return json;
}

export interface DownloadBundleOptions extends CloudTarget {
  modelId: string;
  keep: number;
  bottom?: number;
  top?: number;
  quantize?: Quantization;
  outDir: string;
}

/** Downloads an emulator bundle into `outDir` and verifies it (every file's sha256 and the bundle checksum). */
export async function downloadBundle(options: DownloadBundleOptions): Promise<Bundle> {
  const query = new URLSearchParams({ keep: String(options.keep) });
  if (options.bottom !== undefined) query.set('bottom', String(options.bottom));
  if (options.top !== undefined) query.set('top', String(options.top));
  if (options.quantize !== undefined) query.set('quantize', options.quantize);
  const base = `/v1/models/${encodeURIComponent(options.modelId)}/emulators`;
  const listing = (await (await call(options, 'GET', `${base}?${query}`)).json()) as { files?: BundleFile[] };
  if (!Array.isArray(listing.files)) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the emulator manifest reply has no files', { where: options.cloudUrl });
  const files = new Map<string, Uint8Array>();
  for (const f of listing.files) {
    if (typeof f?.name !== 'string' || !/^[A-Za-z0-9._-]+$/.test(f.name) || f.name.startsWith('.')) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `file name ${JSON.stringify(f?.name)} is not a plain file name`, { where: options.cloudUrl });
    files.set(f.name, new Uint8Array(await (await call(options, 'GET', `${base}/files/${encodeURIComponent(f.name)}?${query}`)).arrayBuffer()));
  }
  await writeBundleFiles(options.outDir, files);
  return readBundle(options.outDir);
}
