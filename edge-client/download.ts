// The edge part of a model: the cloud's REST API lists models and serves, per cut, the
// embedding, the bottom and top blocks, the final norm and head, config and tokenizer.
// Every file is checked against the manifest's sha256 and cached by content hash and cut,
// so a second run starts without the network.
import { constants as bufferConstants } from 'node:buffer';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { request as httpsRequest } from 'node:https';
import { homedir, totalmem } from 'node:os';
import { join } from 'node:path';
import { CONFIG_FILE, LlamaModel, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, checkTokenizerFits, expectedTensorShapes, loadTokenizer, maxCheckpointTensors, onEdge, readModelConfig, readSafetensorsFile, toFloat32 } from '../model/index.ts';
import type { Cut, ModelConfig, Tokenizer } from '../model/index.ts';
import { DEFAULT_CUT, EDGE_WEIGHTS_FILE } from '../protocol/index.ts';
import type { CutLimits, EdgeManifest, FileEntry, ModelDescription } from '../protocol/index.ts';
import { readBody, readErrorText, readJson } from './reply-body.ts';
import { EdgeError } from './errors.ts';

/** The files of an edge part; all but tokenizer_config.json are required. */
export const EDGE_FILES = [EDGE_WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] as const;
const OPTIONAL_FILES: readonly string[] = [TOKENIZER_CONFIG_FILE];
const MANIFEST_FILE = 'manifest.json';

/**
 * The most bytes one downloaded file (of an edge part or an emulator bundle) may declare: the
 * download holds a file whole in one Uint8Array, and none is longer than Node's largest buffer
 * (4 GiB on Node 20).
 */
export const MAX_DOWNLOAD_FILE_BYTES = bufferConstants.MAX_LENGTH;

/**
 * The most bytes the files of one download may declare together: this machine's memory. The edge
 * holds a whole edge part (or bundle) in memory once loaded, so a bigger one could never be used,
 * and refusing it up front keeps a cloud from filling the disk with it.
 */
export function maxDownloadBytes(): number {
  return totalmem();
}

/** The most files a listing may name: an edge part has four, an emulator bundle six at most. */
const MAX_LISTED_FILES = 64;

/**
 * The files of a listing (an edge part's manifest, an emulator bundle's), checked before anything
 * is downloaded: each a plain file name (it becomes a path) listed once, with a sha256 and a
 * declared size that is a non-negative integer of at most MAX_DOWNLOAD_FILE_BYTES, all together
 * at most maxDownloadBytes(). The sha256 is as the cloud wrote it.
 */
export function parseFileEntries(list: unknown, where: string): FileEntry[] {
  if (!Array.isArray(list)) throw invalid('files must be a list', where);
  if (list.length > MAX_LISTED_FILES) throw invalid(`the listing names ${list.length} files, over the limit of ${MAX_LISTED_FILES}`, where);
  const names = new Set<string>();
  let total = 0;
  const files = list.map((f: unknown, i) => {
    if (!isObject(f) || typeof f.name !== 'string' || typeof f.sha256 !== 'string') throw invalid(`files[${i}] needs name, bytes and sha256`, where);
    if (!/^[A-Za-z0-9._-]+$/.test(f.name) || f.name.startsWith('.')) throw invalid(`files[${i}].name ${JSON.stringify(f.name)} is not a plain file name`, where);
    if (names.has(f.name)) throw invalid(`files[${i}].name ${JSON.stringify(f.name)} is listed twice`, where);
    names.add(f.name);
    if (typeof f.bytes !== 'number' || !Number.isSafeInteger(f.bytes) || f.bytes < 0 || f.bytes > MAX_DOWNLOAD_FILE_BYTES) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `files[${i}].bytes must be an integer in [0, ${MAX_DOWNLOAD_FILE_BYTES}], got ${JSON.stringify(f.bytes)}`, { where, details: { limit: MAX_DOWNLOAD_FILE_BYTES } });
    }
    total += f.bytes;
    return { name: f.name, bytes: f.bytes, sha256: f.sha256 };
  });
  const limit = maxDownloadBytes();
  if (total > limit) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the files declare ${total} bytes together, over the limit of ${limit} (this machine's memory)`, { where, details: { bytes: total, limit } });
  return files;
}

/**
 * A downloaded file's bytes, never more than the `bytes` its listing declares: a content-length
 * over it is refused before a byte is read, and a body passing it is cut off there. Fewer bytes
 * than declared are TANDEM_EDGE_DOWNLOAD_CORRUPT too.
 */
export async function readDeclaredFile(res: Response, file: FileEntry, where: string): Promise<Uint8Array> {
  const bytes = await readBody(res, {
    limit: file.bytes,
    where,
    tooLarge: (n, declared) => new EdgeError('TANDEM_EDGE_DOWNLOAD_CORRUPT', `${declared ? `the reply declares ${n} bytes` : `got more than ${file.bytes} bytes (${n} had arrived)`}, the manifest says ${file.bytes}`, { where, details: { file: file.name, bytes: n, limit: file.bytes } }),
  });
  if (bytes.length !== file.bytes) throw new EdgeError('TANDEM_EDGE_DOWNLOAD_CORRUPT', `got ${bytes.length} bytes, the manifest says ${file.bytes}`, { where, details: { file: file.name, bytes: bytes.length, limit: file.bytes } });
  return bytes;
}

export interface EdgePart {
  /** The cache folder holding the files of EDGE_FILES. */
  dir: string;
  manifest: EdgeManifest;
  /** True when nothing had to be downloaded. */
  cached: boolean;
  /** Bytes downloaded now. */
  downloadedBytes: number;
}

/** The default cache: $TANDEM_CACHE or ~/.cache/tandem. */
export function defaultCacheDir(): string {
  return process.env.TANDEM_CACHE || join(homedir(), '.cache', 'tandem');
}

/** A JSON object (not null, not an array): what a reply's parsers check first. */
export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function invalid(what: string, where: string): EdgeError {
  return new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', what, { where });
}

function parseCut(v: unknown, where: string, field: string): Cut {
  if (!isObject(v) || !Number.isInteger(v.bottom) || !Number.isInteger(v.top) || (v.bottom as number) < 0 || (v.top as number) < 0) {
    throw invalid(`${field} must be {bottom, top} of non-negative integers`, where);
  }
  return { bottom: v.bottom as number, top: v.top as number };
}

function parseCutLimits(v: unknown, where: string, field: string): CutLimits {
  const keys = ['minBottom', 'minTop', 'maxBottomPlusTop'] as const;
  if (!isObject(v) || !keys.every((k) => Number.isInteger(v[k]) && (v[k] as number) >= 0)) throw invalid(`${field} must be {${keys.join(', ')}} of non-negative integers`, where);
  return { minBottom: v.minBottom as number, minTop: v.minTop as number, maxBottomPlusTop: v.maxBottomPlusTop as number };
}

/** TLS failures meaning the cloud's certificate is not trusted: unknown CA, self-signed, wrong name, expired. */
const TLS_TRUST_CODES = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_SIGNATURE_FAILURE', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'CERT_UNTRUSTED',
  'CERT_REJECTED', 'ERR_TLS_CERT_ALTNAME_INVALID', 'HOSTNAME_MISMATCH',
]);

/** The TLS trust failure code inside an error (fetch's cause, ws' error event, engine.io's description), if any. */
export function tlsTrustFailure(err: unknown, depth = 0): string | undefined {
  if (typeof err !== 'object' || err === null || depth > 4) return undefined;
  const e = err as { code?: unknown; cause?: unknown; error?: unknown; description?: unknown };
  if (typeof e.code === 'string' && TLS_TRUST_CODES.has(e.code)) return e.code;
  return tlsTrustFailure(e.cause, depth + 1) ?? tlsTrustFailure(e.error, depth + 1) ?? tlsTrustFailure(e.description, depth + 1);
}

/** TANDEM_EDGE_TLS_UNTRUSTED naming the URL whose certificate failed. */
export function tlsUntrusted(url: string, code: string, cause: unknown): EdgeError {
  return new EdgeError('TANDEM_EDGE_TLS_UNTRUSTED', `the TLS certificate of ${url} is not trusted (${code}); for a private CA pass --ca FILE`, { where: url, cause });
}

export interface CloudFetchInit {
  method?: string;
  headers?: Record<string, string>;
  body?: string;
  timeoutMs?: number;
  /** PEM CA certificate(s) the cloud's certificate must chain to, instead of the system's. */
  ca?: string;
}

/**
 * fetch() for the cloud's REST API. With a private CA the request goes through node:https
 * (Node's fetch takes no CA), and the answer is the same Response, its body streaming as it
 * arrives (whoever reads it bounds it). A certificate that does not verify is
 * TANDEM_EDGE_TLS_UNTRUSTED naming the URL; other failures are thrown as they come.
 */
export async function cloudFetch(url: string, init: CloudFetchInit = {}): Promise<Response> {
  const signal = AbortSignal.timeout(init.timeoutMs ?? 60_000);
  try {
    if (init.ca === undefined || !url.startsWith('https:')) return await fetch(url, { method: init.method, headers: init.headers, body: init.body, signal });
    return await new Promise<Response>((resolve, reject) => {
      const req = httpsRequest(url, { method: init.method ?? 'GET', headers: init.headers, ca: init.ca, signal }, (res) => {
        const headers = new Headers();
        for (const [name, value] of Object.entries(res.headers)) if (value !== undefined) headers.set(name, Array.isArray(value) ? value.join(', ') : value);
        const status = res.statusCode ?? 500;
        if (status === 204 || status === 304) {
          res.resume();
          resolve(new Response(null, { status, statusText: res.statusMessage, headers }));
          return;
        }
        // One chunk at a time, as the reader pulls: nothing is read ahead of it, and cancelling ends the connection.
        const body = new ReadableStream<Uint8Array>({
          start(controller) {
            res.on('data', (c: Buffer) => {
              controller.enqueue(new Uint8Array(c.buffer, c.byteOffset, c.byteLength));
              if ((controller.desiredSize ?? 0) <= 0) res.pause();
            });
            res.on('end', () => controller.close());
            res.on('error', (err) => controller.error(err));
            res.pause();
          },
          pull() {
            res.resume();
          },
          cancel() {
            res.destroy();
          },
        });
        resolve(new Response(body, { status, statusText: res.statusMessage, headers }));
      });
      req.on('error', reject);
      req.end(init.body);
    });
  } catch (cause) {
    const code = tlsTrustFailure(cause);
    if (code !== undefined) throw tlsUntrusted(url, code, cause);
    throw cause;
  }
}

/** The slowest transfer an edge file is given time for (512 kbit/s): a 1 GB file gets 4.5 hours. */
export const MIN_DOWNLOAD_BYTES_PER_SECOND = 64 * 1024;

/** The REST half of the cloud API, with the key in every request. */
export class CloudRest {
  readonly baseUrl: string;

  constructor(
    url: string,
    private readonly key: string,
    private readonly timeoutMs = 60_000,
    private readonly ca?: string,
  ) {
    this.baseUrl = url.replace(/\/+$/, '');
  }

  private async get(path: string, timeoutMs = this.timeoutMs): Promise<Response> {
    const url = `${this.baseUrl}${path}`;
    let res: Response;
    try {
      res = await cloudFetch(url, { headers: { authorization: `Bearer ${this.key}` }, timeoutMs, ca: this.ca });
    } catch (cause) {
      if (cause instanceof EdgeError) throw cause;
      throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `GET failed: ${(cause as Error).message}`, { where: url, cause });
    }
    if (res.ok) return res;
    const body = await readErrorText(res, url);
    let remoteCode: string | undefined;
    try {
      const j = JSON.parse(body) as { code?: unknown };
      if (typeof j.code === 'string') remoteCode = j.code;
    } catch {
      // not JSON: the status says enough
    }
    const detail = `${res.status} ${res.statusText}${remoteCode ? ` ${remoteCode}` : ''}`;
    if (res.status === 401 || res.status === 403) throw new EdgeError('TANDEM_EDGE_AUTH_FAILED', `the cloud answered ${detail}`, { where: url, remoteCode });
    if (res.status === 404) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud answered ${detail}`, { where: url, remoteCode });
    throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `the cloud answered ${detail}: ${body.slice(0, 200)}`, { where: url, remoteCode });
  }

  private async json(path: string): Promise<unknown> {
    return readJson(await this.get(path), `${this.baseUrl}${path}`);
  }

  async models(): Promise<ModelDescription[]> {
    const where = `${this.baseUrl}/v1/models`;
    const body = await this.json('/v1/models');
    if (!isObject(body) || !Array.isArray(body.models)) throw invalid('expected {models: [...]}', where);
    return body.models.map((m, i) => {
      if (!isObject(m) || typeof m.id !== 'string' || typeof m.contentHash !== 'string' || !Number.isInteger(m.numLayers)) {
        throw invalid(`models[${i}] needs id, contentHash and numLayers`, where);
      }
      return {
        id: m.id,
        modelType: typeof m.modelType === 'string' ? m.modelType : '',
        contentHash: m.contentHash,
        numLayers: m.numLayers as number,
        config: isObject(m.config) ? m.config : {},
        cuts: parseCutLimits(m.cuts, where, `models[${i}].cuts`),
        defaultCut: parseCut(m.defaultCut ?? DEFAULT_CUT, where, `models[${i}].defaultCut`),
      };
    });
  }

  private edgePath(modelId: string, cut: Cut, suffix = ''): string {
    return `/v1/models/${encodeURIComponent(modelId)}/edge${suffix}?bottom=${cut.bottom}&top=${cut.top}`;
  }

  async manifest(modelId: string, cut: Cut): Promise<EdgeManifest> {
    const path = this.edgePath(modelId, cut);
    const where = `${this.baseUrl}${path}`;
    const body = await this.json(path);
    if (!isObject(body) || typeof body.contentHash !== 'string' || !Array.isArray(body.files)) throw invalid('expected {model, contentHash, cut, files}', where);
    const files = parseFileEntries(body.files, where).map((f) => ({ ...f, sha256: f.sha256.replace(/^sha256:/, '').toLowerCase() }));
    for (const name of EDGE_FILES) if (!OPTIONAL_FILES.includes(name) && !files.some((f) => f.name === name)) throw invalid(`the manifest lists no ${name}`, where);
    const got = parseCut(body.cut ?? cut, where, 'cut');
    if (got.bottom !== cut.bottom || got.top !== cut.top) throw invalid(`the manifest is for cut (${got.bottom}, ${got.top}), not (${cut.bottom}, ${cut.top})`, where);
    return { model: typeof body.model === 'string' ? body.model : modelId, contentHash: body.contentHash, cut: got, files };
  }

  /**
   * One file of the manifest, read no further than the bytes the manifest declares for it, within
   * the timeout and the time its bytes take at MIN_DOWNLOAD_BYTES_PER_SECOND (a fixed 60 s failed
   * every file that takes longer to cross, however steadily it came).
   */
  async file(modelId: string, cut: Cut, file: FileEntry): Promise<Uint8Array> {
    const res = await this.get(this.edgePath(modelId, cut, `/files/${encodeURIComponent(file.name)}`), Math.ceil(this.timeoutMs + (file.bytes / MIN_DOWNLOAD_BYTES_PER_SECOND) * 1000));
    return readDeclaredFile(res, file, `${this.baseUrl} file ${file.name}`);
  }
}

const sha256 = (bytes: Uint8Array): string => createHash('sha256').update(bytes).digest('hex');

/** `bytes` when their sha256 is the one listed for `file` (hex, with or without "sha256:"), else TANDEM_EDGE_DOWNLOAD_CORRUPT. */
export function checkListedSha256(bytes: Uint8Array, file: FileEntry, where: string): Uint8Array {
  const got = sha256(bytes);
  const listed = file.sha256.replace(/^sha256:/, '').toLowerCase();
  if (got !== listed) throw new EdgeError('TANDEM_EDGE_DOWNLOAD_CORRUPT', `sha256 ${got} differs from the manifest's ${listed}`, { where, details: { file: file.name } });
  return bytes;
}

function cacheKey(contentHash: string, cut: Cut): string {
  const hash = contentHash.replace(/^sha256:/, '').replace(/[^A-Za-z0-9]/g, '').slice(0, 64);
  return `${hash}-b${cut.bottom}-t${cut.top}`;
}

/**
 * Whether the cache folder holds exactly the manifest's files, each of its size and sha256. An
 * edge file the manifest does not list counts against it: the loader reads an optional one
 * (tokenizer_config.json) wherever it is, so another cloud's, cached under the same content hash,
 * would be used.
 */
async function cachedFilesMatch(dir: string, manifest: EdgeManifest): Promise<boolean> {
  for (const name of EDGE_FILES) {
    if (!manifest.files.some((f) => f.name === name) && (await stat(join(dir, name)).then(() => true, () => false))) return false;
  }
  for (const f of manifest.files) {
    const path = join(dir, f.name);
    const s = await stat(path).catch(() => undefined);
    if (!s || s.size !== f.bytes) return false;
    if (sha256(await readFile(path)) !== f.sha256) return false;
  }
  return true;
}

/**
 * The edge part of `modelId` at `cut` in the cache, downloading what is missing. The folder
 * is written to a temporary sibling and renamed into place, so a crash leaves no half cache.
 */
export async function downloadEdgePart(rest: CloudRest, modelId: string, cut: Cut, cacheDir = defaultCacheDir()): Promise<EdgePart> {
  const manifest = await rest.manifest(modelId, cut);
  const dir = join(cacheDir, cacheKey(manifest.contentHash, cut));
  if (await cachedFilesMatch(dir, manifest)) return { dir, manifest, cached: true, downloadedBytes: 0 };
  await mkdir(cacheDir, { recursive: true });
  const tmp = join(cacheDir, `.${cacheKey(manifest.contentHash, cut)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  let downloadedBytes = 0;
  try {
    await mkdir(tmp);
    for (const f of manifest.files) {
      const bytes = checkListedSha256(await rest.file(modelId, cut, f), f, `${rest.baseUrl} file ${f.name}`);
      downloadedBytes += bytes.length;
      await writeFile(join(tmp, f.name), bytes);
    }
    await writeFile(join(tmp, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
    await rm(dir, { recursive: true, force: true });
    await rename(tmp, dir);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  return { dir, manifest, cached: false, downloadedBytes };
}

/** Names of the tensors the edge holds at `cut`. */
export function edgeTensorNames(config: ModelConfig, cut: Cut): string[] {
  return [...expectedTensorShapes(config).keys()].filter((name) => onEdge(name, cut, config.numHiddenLayers));
}

export interface LoadedEdgePart {
  config: ModelConfig;
  model: LlamaModel;
  tokenizer: Tokenizer;
  contentHash: string;
  cut: Cut;
}

/** Builds the edge LlamaModel (only the edge's tensors; the middle blocks are absent) and the tokenizer. */
export async function loadEdgePart(part: EdgePart): Promise<LoadedEdgePart> {
  const configPath = join(part.dir, CONFIG_FILE);
  // The cloud decides these bytes (the manifest's sha256 only says they arrived intact): the typed reader refuses what is not a config.
  const config = await readModelConfig(part.dir);
  const tokenizer = await loadTokenizer(part.dir);
  // Ids past vocab_size would index no embedding row: refused before the weights are read.
  try {
    checkTokenizerFits(tokenizer, config.vocabSize);
  } catch (cause) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', (cause as Error).message, { where: tokenizer.path, cause });
  }
  const weightsPath = join(part.dir, EDGE_WEIGHTS_FILE);
  // A header naming more tensors than the whole model has is refused before it is parsed.
  const contents = await readSafetensorsFile(weightsPath, { maxTensors: maxCheckpointTensors(config) });
  const { cut } = part.manifest;
  if (cut.bottom + cut.top > config.numHiddenLayers) throw invalid(`cut (${cut.bottom}, ${cut.top}) leaves no room in ${config.numHiddenLayers} layers`, configPath);
  const arrays = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const name of edgeTensorNames(config, cut)) {
    const entry = contents.tensors.get(name);
    if (!entry) throw new EdgeError('TANDEM_EDGE_DOWNLOAD_CORRUPT', `the edge weights lack ${name}`, { where: weightsPath });
    arrays.set(name, { shape: [...entry.shape], data: toFloat32(entry, weightsPath, name) });
  }
  const model = LlamaModel.fromArrays(config, arrays);
  return { config, model, tokenizer, contentHash: part.manifest.contentHash, cut };
}
