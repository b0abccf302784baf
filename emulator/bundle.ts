// The emulator bundle on disk: what the edge needs to train offsite, with a manifest and a
// checksum over all of it. See README.md for the format.
import { createHash } from 'node:crypto';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, expectedTensorShapes, layerOf, parseModelConfig, renameLayer, parseSafetensors, serializeSafetensors, toFloat32, writeFileAtomic } from '../model/index.ts';
import type { ModelConfig, SafetensorsContents, Weight, Weights } from '../model/index.ts';
import { EmulatorError } from './errors.ts';
import { checkLayout, emulatedLayerCount, toEmulatedLayer } from './layer-drop.ts';
import type { Cut, EmulatorLayout } from './layer-drop.ts';
import { QUANTIZATIONS, SCALE_SUFFIX, dequantizeInt8Rows, encodeWeights, isQuantizable } from './quantize.ts';
import type { Quantization } from './quantize.ts';

export const BUNDLE_FORMAT = 'tandem-emulator-bundle';
export const BUNDLE_VERSION = 1;
export const MANIFEST_FILE = 'manifest.json';
/** Embedding, bottom and top blocks, final norm, head: F32 under the full model's names. */
export const EDGE_WEIGHTS_FILE = 'edge.safetensors';
/** The kept middle blocks under the full model's names: F32, or I8 plus `_scale` when quantized. */
export const EMULATOR_WEIGHTS_FILE = 'emulator.safetensors';
const OPTIONAL_FILES = [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE];

export interface BundleFile {
  name: string;
  bytes: number;
  /** hex */
  sha256: string;
}

export interface Distillation {
  /** The data file's base name and sha256 (hex). */
  data: string;
  dataSha256: string;
  steps: number;
  /** Weight of the normalized hidden-state MSE next to the LM loss. */
  lambda: number;
  lr: number;
  batchSize: number;
  seqLen: number;
  seed: number;
  /** Mean over the last steps: total, LM and hidden-state terms. */
  finalLoss: number;
  finalLmLoss: number;
  finalKdLoss: number;
}

export interface Fidelity {
  /** What perplexity and cosine were measured on (a file's base name), null when nothing was. */
  data: string | null;
  tokens: number;
  fullPerplexity: number | null;
  emulatorPerplexity: number | null;
  /** Mean over tokens of the cosine similarity between the full middle's and the emulator's outputs. */
  middleCosine: number | null;
  /** Bytes of emulator.safetensors. */
  emulatorBytes: number;
  /** Float32 bytes of the full middle's weights. */
  fullMiddleBytes: number;
  /** emulatorBytes / fullMiddleBytes. */
  sizeRatio: number;
}

export interface BundleManifest {
  format: typeof BUNDLE_FORMAT;
  version: typeof BUNDLE_VERSION;
  baseModel: { id: string; contentHash: string; numLayers: number };
  cut: Cut;
  /** Full-model indices of the middle blocks the emulator keeps. */
  keptLayers: number[];
  /** B + K + T: blocks of the emulated model. */
  emulatedLayers: number;
  quantization: { method: Quantization; scheme: 'absmax-per-output-row'; scaleSuffix: string } | null;
  distillation: Distillation | null;
  fidelity: Fidelity;
  /** Every other file of the bundle, by name. */
  files: BundleFile[];
  /** "sha256:<hex>", see bundleChecksum. */
  checksum: string;
}

export type ManifestBody = Omit<BundleManifest, 'files' | 'checksum'>;

/** A bundle read and verified, weights in float32 under the full model's names. */
export interface Bundle {
  dir: string;
  manifest: BundleManifest;
  rawConfig: Record<string, unknown>;
  config: ModelConfig;
  layout: EmulatorLayout;
  edgeWeights: Weights;
  emulatorWeights: Weights;
  /** Tokenizer files present in the bundle, as paths. */
  tokenizerFiles: string[];
}

function sha256(bytes: Uint8Array | string): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/** JSON with object keys sorted at every level and no whitespace: one text per value. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/**
 * "sha256:<hex>" of "tandem-emulator-bundle-v1\n", then for each file in ascending name order
 * `name \n byte count \n bytes`, then "manifest.json\n" and the canonical JSON of the manifest
 * without its checksum field. So every byte of every file, and every manifest field, counts.
 */
export function bundleChecksum(files: ReadonlyMap<string, Uint8Array>, manifestWithoutChecksum: Omit<BundleManifest, 'checksum'>): string {
  const hash = createHash('sha256');
  hash.update(`${BUNDLE_FORMAT}-v${BUNDLE_VERSION}\n`);
  for (const name of [...files.keys()].sort()) {
    const bytes = files.get(name) as Uint8Array;
    hash.update(`${name}\n${bytes.length}\n`);
    hash.update(bytes);
  }
  hash.update(`${MANIFEST_FILE}\n${canonicalJson(manifestWithoutChecksum)}`);
  return `sha256:${hash.digest('hex')}`;
}

export interface BundleContents {
  rawConfig: Record<string, unknown>;
  /** The full model's edge weights (embedding, bottom, top, norm, head), full names. */
  edgeWeights: ReadonlyMap<string, Weight>;
  /** The kept blocks, full names, float32 (quantized on writing when the body says so). */
  emulatorWeights: ReadonlyMap<string, Weight>;
  /** Extra files by name (tokenizer.json, tokenizer_config.json). */
  sideFiles: ReadonlyMap<string, Uint8Array>;
}

/** The bytes of every file of a bundle, manifest included, in memory. */
export function encodeBundle(contents: BundleContents, body: ManifestBody, emulatorFile?: Uint8Array): { files: Map<string, Uint8Array>; manifest: BundleManifest } {
  const files = new Map<string, Uint8Array>();
  files.set(CONFIG_FILE, Buffer.from(`${JSON.stringify(contents.rawConfig, null, 2)}\n`));
  const edge = new Map([...contents.edgeWeights].map(([name, w]) => [name, { dtype: 'F32' as const, shape: w.shape, data: w.data }]));
  files.set(EDGE_WEIGHTS_FILE, serializeSafetensors(edge, { format: 'pt', contentHash: body.baseModel.contentHash }));
  files.set(EMULATOR_WEIGHTS_FILE, emulatorFile ?? encodeEmulatorWeights(contents.emulatorWeights, body.quantization?.method ?? null, body.baseModel.contentHash));
  for (const [name, bytes] of contents.sideFiles) files.set(name, bytes);
  const list = [...files.keys()].sort().map((name) => ({ name, bytes: (files.get(name) as Uint8Array).length, sha256: sha256(files.get(name) as Uint8Array) }));
  const withoutChecksum = { ...body, files: list };
  const manifest: BundleManifest = { ...withoutChecksum, checksum: bundleChecksum(files, withoutChecksum) };
  files.set(MANIFEST_FILE, Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`));
  return { files, manifest };
}

export function encodeEmulatorWeights(weights: ReadonlyMap<string, Weight>, quantization: Quantization | null, contentHash: string): Uint8Array {
  return serializeSafetensors(encodeWeights(weights, quantization), { format: 'pt', contentHash, quantization: quantization ?? 'none' });
}

/** Writes the files of a bundle; the manifest last, so a folder with a manifest is complete. */
export async function writeBundleFiles(dir: string, files: ReadonlyMap<string, Uint8Array>): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const [name, bytes] of files) if (name !== MANIFEST_FILE) await writeFileAtomic(join(dir, name), bytes);
  const manifest = files.get(MANIFEST_FILE);
  if (manifest === undefined) throw new EmulatorError('TANDEM_BUNDLE_INVALID', 'a bundle needs its manifest', { file: MANIFEST_FILE });
  await writeFileAtomic(join(dir, MANIFEST_FILE), manifest);
}

/** The most files a bundle lists (as many as the edge takes from a download listing). */
export const MAX_BUNDLE_FILES = 64;
/** The largest manifest.json read (a bundle's is a few KiB). */
const MAX_MANIFEST_BYTES = 1024 * 1024;

function invalid(message: string, file: string, field?: string): EmulatorError {
  return new EmulatorError('TANDEM_BUNDLE_INVALID', message, { file, field });
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isInt = (v: unknown, min = 0): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min;

/** Validates a parsed manifest field by field. */
export function parseManifest(json: unknown, file: string): BundleManifest {
  if (!isObject(json)) throw invalid('the manifest must be a JSON object', file);
  if (json.format !== BUNDLE_FORMAT) throw invalid(`format must be ${JSON.stringify(BUNDLE_FORMAT)}, got ${JSON.stringify(json.format)}`, file, 'format');
  if (json.version !== BUNDLE_VERSION) throw invalid(`version ${JSON.stringify(json.version)} is not supported; this build reads version ${BUNDLE_VERSION}`, file, 'version');
  const base = json.baseModel;
  if (!isObject(base) || typeof base.id !== 'string' || typeof base.contentHash !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(base.contentHash) || !isInt(base.numLayers, 1)) {
    throw invalid('baseModel needs id, contentHash ("sha256:<hex>") and numLayers', file, 'baseModel');
  }
  const cut = json.cut;
  if (!isObject(cut) || !isInt(cut.bottom) || !isInt(cut.top)) throw invalid('cut needs integer bottom and top', file, 'cut');
  const kept = json.keptLayers;
  if (!Array.isArray(kept) || !kept.every((k) => isInt(k))) throw invalid('keptLayers must be a list of block indices', file, 'keptLayers');
  const layout: EmulatorLayout = { numLayers: base.numLayers, cut: { bottom: cut.bottom, top: cut.top }, kept: kept as number[] };
  try {
    checkLayout(layout, file);
  } catch (err) {
    if (err instanceof EmulatorError && err.code === 'TANDEM_BUNDLE_INVALID') throw err;
    throw invalid((err as Error).message, file, 'cut');
  }
  if (json.emulatedLayers !== emulatedLayerCount(layout)) throw invalid(`emulatedLayers must be B + K + T = ${emulatedLayerCount(layout)}`, file, 'emulatedLayers');
  const q = json.quantization;
  if (q !== null && (!isObject(q) || !QUANTIZATIONS.includes(q.method as Quantization) || q.scaleSuffix !== SCALE_SUFFIX)) {
    throw invalid(`quantization must be null or {method: ${QUANTIZATIONS.join('|')}, scaleSuffix: "${SCALE_SUFFIX}"}`, file, 'quantization');
  }
  if (json.distillation !== null && !isObject(json.distillation)) throw invalid('distillation must be null or an object', file, 'distillation');
  if (!isObject(json.fidelity)) throw invalid('fidelity must be an object', file, 'fidelity');
  const files = json.files;
  if (!Array.isArray(files) || !files.every((f) => isObject(f) && typeof f.name === 'string' && isInt(f.bytes) && typeof f.sha256 === 'string')) {
    throw invalid('files must list {name, bytes, sha256}', file, 'files');
  }
  // Each file listed is read and hashed: listed 10,000 times, one file was read 10,000 times.
  if (files.length > MAX_BUNDLE_FILES) throw invalid(`files lists ${files.length} files, over the limit of ${MAX_BUNDLE_FILES}`, file, 'files');
  const names = new Set<string>();
  for (const f of files as BundleFile[]) {
    if (f.name === MANIFEST_FILE || !/^[A-Za-z0-9._-]+$/.test(f.name) || f.name.startsWith('.')) throw invalid(`file name ${JSON.stringify(f.name)} must be a plain file name other than the manifest`, file, 'files');
    if (names.has(f.name)) throw invalid(`files lists ${f.name} twice`, file, 'files');
    names.add(f.name);
  }
  for (const required of [CONFIG_FILE, EDGE_WEIGHTS_FILE, EMULATOR_WEIGHTS_FILE]) {
    if (!(files as BundleFile[]).some((f) => f.name === required)) throw invalid(`files must include ${required}`, file, 'files');
  }
  if (typeof json.checksum !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(json.checksum)) throw invalid('checksum must be "sha256:<hex>"', file, 'checksum');
  return json as unknown as BundleManifest;
}

/**
 * A file of the bundle, read only when it is a regular file of the size expected (`bytes`, as
 * the manifest records) or at most `maxBytes`: a named pipe would block the read for good, and
 * /dev/zero would fill the memory.
 */
async function readBundleFile(dir: string, name: string, size: { bytes: number } | { maxBytes: number }): Promise<Uint8Array> {
  const path = join(dir, name);
  const fail = (cause: unknown): EmulatorError => {
    const code = (cause as NodeJS.ErrnoException).code;
    return new EmulatorError('TANDEM_BUNDLE_INVALID', code === 'ENOENT' ? 'the manifest lists this file but the bundle lacks it' : `the file could not be read (${code ?? String(cause)})`, { file: path, cause });
  };
  const info = await stat(path).catch((cause: unknown) => { throw fail(cause); });
  if (!info.isFile()) throw new EmulatorError('TANDEM_BUNDLE_INVALID', 'is not a regular file', { file: path });
  if ('bytes' in size && info.size !== size.bytes) {
    throw new EmulatorError('TANDEM_BUNDLE_CHECKSUM_MISMATCH', `${name} has ${info.size} bytes; the manifest records ${size.bytes}`, { file: path, details: { name } });
  }
  if ('maxBytes' in size && info.size > size.maxBytes) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `holds ${info.size} bytes, over the limit of ${size.maxBytes}`, { file: path });
  try {
    return new Uint8Array(await readFile(path));
  } catch (cause) {
    throw fail(cause);
  }
}

/**
 * Reads and verifies a bundle's files: each file's sha256 and size against the manifest
 * (TANDEM_BUNDLE_CHECKSUM_MISMATCH naming the file), then the whole-bundle checksum, which
 * also covers the manifest's own fields.
 */
export async function verifyBundle(dir: string): Promise<{ manifest: BundleManifest; files: Map<string, Uint8Array> }> {
  const manifestPath = join(dir, MANIFEST_FILE);
  if (!(await stat(manifestPath).then((s) => s.isFile(), () => false))) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `the folder has no ${MANIFEST_FILE}; is it an emulator bundle?`, { file: manifestPath });
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(await readBundleFile(dir, MANIFEST_FILE, { maxBytes: MAX_MANIFEST_BYTES })).toString('utf8'));
  } catch (cause) {
    if (cause instanceof EmulatorError) throw cause;
    throw new EmulatorError('TANDEM_BUNDLE_INVALID', `the manifest is not valid JSON: ${(cause as Error).message}`, { file: manifestPath, cause });
  }
  const manifest = parseManifest(json, manifestPath);
  const files = new Map<string, Uint8Array>();
  for (const f of manifest.files) {
    const bytes = await readBundleFile(dir, f.name, { bytes: f.bytes });
    const actual = sha256(bytes);
    if (bytes.length !== f.bytes || actual !== f.sha256) {
      throw new EmulatorError('TANDEM_BUNDLE_CHECKSUM_MISMATCH', `${f.name} has ${bytes.length} bytes with sha256 ${actual}; the manifest records ${f.bytes} bytes with sha256 ${f.sha256}`, {
        file: join(dir, f.name),
        details: { name: f.name },
      });
    }
    files.set(f.name, bytes);
  }
  const { checksum, ...rest } = manifest;
  const actual = bundleChecksum(files, rest);
  if (actual !== checksum) {
    throw new EmulatorError('TANDEM_BUNDLE_CHECKSUM_MISMATCH', `the bundle checksum is ${actual}; the manifest records ${checksum} (a manifest field was changed)`, { file: manifestPath, details: { name: MANIFEST_FILE } });
  }
  return { manifest, files };
}

function parseWeights(bytes: Uint8Array, path: string): SafetensorsContents {
  return parseSafetensors(bytes, path);
}

/** The float32 weights of a safetensors file, I8 weights dequantized with their scales. */
function decodeWeights(contents: SafetensorsContents, path: string): Weights {
  const out: Weights = new Map();
  for (const [name, entry] of contents.tensors) {
    if (name.endsWith(SCALE_SUFFIX)) continue;
    if (entry.dtype === 'I8') {
      const scale = contents.tensors.get(`${name}${SCALE_SUFFIX}`);
      if (!isQuantizable(name, entry.shape) || scale === undefined || scale.shape.length !== 1 || scale.shape[0] !== entry.shape[0]) {
        throw new EmulatorError('TANDEM_BUNDLE_INVALID', `an I8 tensor must be a linear weight with ${name}${SCALE_SUFFIX} of [${entry.shape[0]}] beside it`, { file: path, field: name });
      }
      const values = new Int8Array(entry.data.buffer, entry.data.byteOffset, entry.data.byteLength);
      out.set(name, { shape: [...entry.shape], data: dequantizeInt8Rows(values, Float32Array.from(toFloat32(scale, path, `${name}${SCALE_SUFFIX}`)), entry.shape[1]) });
    } else {
      out.set(name, { shape: [...entry.shape], data: Float32Array.from(toFloat32(entry, path, name)) });
    }
  }
  for (const name of contents.tensors.keys()) {
    if (name.endsWith(SCALE_SUFFIX) && !out.has(name.slice(0, -SCALE_SUFFIX.length))) throw new EmulatorError('TANDEM_BUNDLE_INVALID', 'a scale tensor without its weight', { file: path, field: name });
  }
  return out;
}

/** Exactly the expected tensors (by the full config), with their shapes. */
function checkTensors(weights: Weights, expected: Map<string, number[]>, path: string): void {
  for (const [name, shape] of expected) {
    const w = weights.get(name);
    if (w === undefined) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `the file lacks ${name}`, { file: path, field: name });
    if (w.shape.length !== shape.length || w.shape.some((d, i) => d !== shape[i])) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `${name} has shape [${w.shape}], expected [${shape}]`, { file: path, field: name });
  }
  for (const name of weights.keys()) if (!expected.has(name)) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `the file holds ${name}, which does not belong in it`, { file: path, field: name });
}

/** Reads a bundle folder, verifying every byte first (see verifyBundle). */
export async function readBundle(dir: string): Promise<Bundle> {
  const { manifest, files } = await verifyBundle(dir);
  const configPath = join(dir, CONFIG_FILE);
  let rawConfig: Record<string, unknown>;
  try {
    rawConfig = JSON.parse(Buffer.from(files.get(CONFIG_FILE) as Uint8Array).toString('utf8')) as Record<string, unknown>;
  } catch (cause) {
    throw new EmulatorError('TANDEM_BUNDLE_INVALID', `config.json is not valid JSON: ${(cause as Error).message}`, { file: configPath, cause });
  }
  const config = parseModelConfig(rawConfig, configPath);
  const layout: EmulatorLayout = { numLayers: manifest.baseModel.numLayers, cut: manifest.cut, kept: manifest.keptLayers };
  if (config.numHiddenLayers !== layout.numLayers) throw new EmulatorError('TANDEM_BUNDLE_INVALID', `config.json has ${config.numHiddenLayers} blocks; the manifest says ${layout.numLayers}`, { file: configPath });
  const expected = expectedTensorShapes(config);
  const emulatorNames = new Set(layout.kept);
  const edgeExpected = new Map([...expected].filter(([name]) => {
    const l = layerOf(name);
    return l === undefined || l < layout.cut.bottom || l >= layout.numLayers - layout.cut.top;
  }));
  const emulatorExpected = new Map([...expected].filter(([name]) => emulatorNames.has(layerOf(name) ?? -1)));
  const edgePath = join(dir, EDGE_WEIGHTS_FILE);
  const emulatorPath = join(dir, EMULATOR_WEIGHTS_FILE);
  const edgeWeights = decodeWeights(parseWeights(files.get(EDGE_WEIGHTS_FILE) as Uint8Array, edgePath), edgePath);
  const emulatorWeights = decodeWeights(parseWeights(files.get(EMULATOR_WEIGHTS_FILE) as Uint8Array, emulatorPath), emulatorPath);
  checkTensors(edgeWeights, edgeExpected, edgePath);
  checkTensors(emulatorWeights, emulatorExpected, emulatorPath);
  const tokenizerFiles = OPTIONAL_FILES.filter((name) => files.has(name)).map((name) => join(dir, name));
  return { dir, manifest, rawConfig, config, layout, edgeWeights, emulatorWeights, tokenizerFiles };
}

/** config.json of the emulated model: the full model's with num_hidden_layers = B + K + T. */
export function emulatedRawConfig(rawConfig: Record<string, unknown>, layout: EmulatorLayout): Record<string, unknown> {
  return { ...rawConfig, num_hidden_layers: emulatedLayerCount(layout) };
}

/** Renames full-model weights (edge and kept blocks) to the emulated model's block numbers. */
export function emulatedWeights(layout: EmulatorLayout, ...parts: ReadonlyMap<string, Weight>[]): Weights {
  const out: Weights = new Map();
  for (const part of parts) {
    for (const [name, w] of part) {
      const layer = layerOf(name);
      if (layer === undefined) {
        out.set(name, w);
        continue;
      }
      const j = toEmulatedLayer(layout, layer);
      if (j !== undefined) out.set(renameLayer(name, () => j), w);
    }
  }
  return out;
}
