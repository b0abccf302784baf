// `tandem edge upload`: sends an offsite adapter to the cloud, which plugs it into the full
// model and evaluates it on the data sent with it; and the download of emulator bundles.
import { readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE } from '../model/index.ts';
import { readBundle, readOffsiteRecord, writeBundleFiles } from '../emulator/index.ts';
import type { Bundle, BundleFile, Quantization } from '../emulator/index.ts';

/** Errors of talking to the cloud; a refusal carries the cloud's own stable code (e.g. TANDEM_ADAPTER_BASE_MISMATCH). */
export const UPLOAD_ERRORS = {
  TANDEM_CLOUD_UNREACHABLE: 'the cloud node could not be reached',
  TANDEM_CLOUD_REPLY_INVALID: 'the cloud node answered something that is not what the API documents',
} as const;

export class CloudRequestError extends Error {
  override readonly name = 'CloudRequestError';
  /** The cloud's code for a refusal, or one of UPLOAD_ERRORS. */
  readonly code: string;
  /** HTTP status; 0 when there was no answer. */
  readonly status: number;

  constructor(code: string, status: number, message: string, options: { cause?: unknown } = {}) {
    super(message.startsWith(code) ? message : `${code}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.status = status;
  }
}

export interface CloudTarget {
  /** http(s)://host:port of the node. */
  cloudUrl: string;
  key: string;
}

async function call(target: CloudTarget, method: string, path: string, body?: unknown): Promise<Response> {
  const url = `${target.cloudUrl.replace(/\/+$/, '')}${path}`;
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      headers: { authorization: `Bearer ${target.key}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (cause) {
    throw new CloudRequestError('TANDEM_CLOUD_UNREACHABLE', 0, `${method} ${url}: ${(cause as Error).message}`, { cause });
  }
  if (!response.ok) {
    const text = await response.text();
    let code = 'TANDEM_CLOUD_REPLY_INVALID';
    let message = `${method} ${path} answered ${response.status}: ${text.slice(0, 200)}`;
    try {
      const json = JSON.parse(text) as { code?: unknown; message?: unknown };
      if (typeof json.code === 'string') code = json.code;
      if (typeof json.message === 'string') message = json.message;
    } catch {
      // not JSON: keep the generic code
    }
    throw new CloudRequestError(code, response.status, message);
  }
  return response;
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

export interface LmFigures {
  loss: number;
  perplexity: number;
  tokens: number;
  accuracy?: number;
}

export interface PlugInEvaluation {
  model: string;
  contentHash: string;
  /** The full model with the adapter. */
  plugIn: LmFigures;
  /** The full model alone, on the same data. */
  baseline: LmFigures;
  examples: number;
  peftType?: string;
  adapterTensors?: number;
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
  if (typeof json?.plugIn?.loss !== 'number') throw new CloudRequestError('TANDEM_CLOUD_REPLY_INVALID', response.status, 'the evaluation reply has no plugIn figures');
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
  if (!Array.isArray(listing.files)) throw new CloudRequestError('TANDEM_CLOUD_REPLY_INVALID', 200, 'the emulator manifest reply has no files');
  const files = new Map<string, Uint8Array>();
  for (const f of listing.files) {
    if (!/^[A-Za-z0-9._-]+$/.test(f.name) || f.name.startsWith('.')) throw new CloudRequestError('TANDEM_CLOUD_REPLY_INVALID', 200, `file name ${JSON.stringify(f.name)} is not a plain file name`);
    files.set(f.name, new Uint8Array(await (await call(options, 'GET', `${base}/files/${encodeURIComponent(f.name)}?${query}`)).arrayBuffer()));
  }
  await writeBundleFiles(options.outDir, files);
  return readBundle(options.outDir);
}
