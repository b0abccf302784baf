// The safetensors format (huggingface/safetensors): an 8-byte little-endian u64 N,
// N bytes of UTF-8 JSON header, then one byte buffer that the header's tensors cover
// exactly. This reader enforces every rule the reference implementation does and a
// few it leaves implicit (duplicate keys, unknown entry fields); the writer produces
// the reference's layout byte for byte.
import { randomBytes } from 'node:crypto';
import { open, readFile, rename, rm, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { ModelError } from './errors.ts';

/** Element sizes in bytes, in the reference's `Dtype` declaration order (which is its sort order). */
export const SAFETENSORS_DTYPE_SIZES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
} as const;

export type SafetensorsDtype = keyof typeof SAFETENSORS_DTYPE_SIZES;

const DTYPE_ORDER = Object.keys(SAFETENSORS_DTYPE_SIZES) as SafetensorsDtype[];

/** The reference refuses headers above 100 MB; so do we, before allocating anything. */
export const SAFETENSORS_MAX_HEADER_BYTES = 100_000_000;

/**
 * How deeply the header's JSON may nest. A valid header needs 3 levels ({name: {shape: [..]}});
 * the rest is headroom. Checked in one linear pass before JSON.parse, whose cost on a deep
 * header (and the duplicate-key walk's) is the attack: 22M '[' in a 42 MiB header cost 15 s.
 */
export const SAFETENSORS_MAX_HEADER_DEPTH = 8;

const METADATA_KEY = '__metadata__';
const METADATA_KEY_JSON = JSON.stringify(METADATA_KEY);
const ENTRY_KEYS = ['data_offsets', 'dtype', 'shape'];

/** One tensor as read: `data` is a view into the file's bytes, not a copy. */
export interface SafetensorsTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  data: Uint8Array;
}

export interface SafetensorsContents {
  metadata: Record<string, string>;
  tensors: Map<string, SafetensorsTensor>;
}

/** One tensor to write. `data` holds the little-endian element bytes (any typed array is taken as its bytes). */
export interface SafetensorsTensorInput {
  dtype: SafetensorsDtype;
  shape: readonly number[];
  data: ArrayBufferView;
}

export type SafetensorsTensorsInput = ReadonlyMap<string, SafetensorsTensorInput> | Readonly<Record<string, SafetensorsTensorInput>>;

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function invalid(message: string, file: string, tensor?: string): ModelError {
  return new ModelError('TANDEM_SAFETENSORS_INVALID', message, { file, tensor });
}

export function isSafetensorsDtype(v: unknown): v is SafetensorsDtype {
  return typeof v === 'string' && Object.hasOwn(SAFETENSORS_DTYPE_SIZES, v);
}

/** Product of a shape, refusing anything that is not a list of non-negative safe integers or that overflows. */
function elementCount(shape: unknown, file: string, tensor: string): number {
  if (!Array.isArray(shape)) throw invalid(`shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`, file, tensor);
  let n = 1;
  for (const d of shape) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
      throw invalid(`shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`, file, tensor);
    }
    n *= d;
    if (!Number.isSafeInteger(n)) throw invalid(`shape ${JSON.stringify(shape)} has too many elements`, file, tensor);
  }
  return n;
}

/**
 * JSON.parse keeps the last of two equal keys; the header must not be ambiguous, so this
 * walks the (already valid) JSON text and reports the first key repeated inside one object.
 */
function findDuplicateKey(text: string): string | undefined {
  const stack: (Set<string> | null)[] = [];
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      const top = stack[stack.length - 1];
      if (expectKey && top) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.has(key)) return key;
        top.add(key);
        expectKey = false;
      }
      i = j;
    } else if (c === '{') {
      stack.push(new Set());
      expectKey = true;
    } else if (c === '[') {
      stack.push(null);
      expectKey = false;
    } else if (c === '}' || c === ']') {
      stack.pop();
    } else if (c === ',') {
      expectKey = stack[stack.length - 1] !== null;
    }
  }
  return undefined;
}

/**
 * Refuses a header that nests objects or arrays deeper than SAFETENSORS_MAX_HEADER_DEPTH, or
 * whose top-level object has more than `maxTensors` members besides `__metadata__`, counting
 * only brackets and keys outside strings (a backslash escapes the next character).
 * One pass, no allocation; malformed JSON is left for JSON.parse to name.
 */
function checkHeaderShape(text: string, file: string, maxTensors: number): void {
  let depth = 0;
  let inString = false;
  let tensors = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c /* \ */) i++;
      else if (c === 0x22 /* " */) inString = false;
    } else if (c === 0x22) {
      // A string at depth 1 is a member's key (a valid header's values there are objects).
      if (depth === 1 && !text.startsWith(METADATA_KEY_JSON, i) && ++tensors > maxTensors) {
        throw invalid(`header names more than ${maxTensors} tensors, the limit here`, file);
      }
      inString = true;
    } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      if (++depth > SAFETENSORS_MAX_HEADER_DEPTH) {
        throw invalid(`header nests deeper than the limit of ${SAFETENSORS_MAX_HEADER_DEPTH} levels (at character ${i}); a valid header needs 3`, file);
      }
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      depth--;
    }
  }
}

/** Reads and checks the u64 header length N against the limit and the file's size. */
function headerLengthOf(prefix: Uint8Array, fileLength: number, file: string): number {
  if (fileLength < 8 || prefix.byteLength < 8) {
    throw new ModelError('TANDEM_SAFETENSORS_TRUNCATED', `the file holds ${fileLength} bytes, fewer than the 8-byte header length`, { file });
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(SAFETENSORS_MAX_HEADER_BYTES)) {
    throw invalid(`header length ${n} exceeds the limit of ${SAFETENSORS_MAX_HEADER_BYTES} bytes`, file);
  }
  const headerLength = Number(n);
  if (8 + headerLength > fileLength) {
    throw new ModelError('TANDEM_SAFETENSORS_TRUNCATED', `header length ${headerLength} runs past the end of the file (${fileLength} bytes)`, { file });
  }
  return headerLength;
}

/** The header's N bytes: UTF-8, a JSON object, no key repeated. */
function parseHeaderText(headerBytes: Uint8Array, file: string, maxTensors = Infinity): Record<string, unknown> {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch (cause) {
    throw new ModelError('TANDEM_SAFETENSORS_INVALID', 'header is not valid UTF-8', { file, cause });
  }
  if (!text.startsWith('{')) throw invalid('header must be a JSON object starting with "{"', file);
  checkHeaderShape(text, file, maxTensors);
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (cause) {
    throw new ModelError('TANDEM_SAFETENSORS_INVALID', `header is not valid JSON: ${(cause as Error).message}`, { file, cause });
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) throw invalid('header must be a JSON object', file);
  const dup = findDuplicateKey(text);
  if (dup !== undefined) throw invalid(`header repeats the key ${JSON.stringify(dup)}`, file, dup);
  return header as Record<string, unknown>;
}

function parseMetadata(v: unknown, file: string): Record<string, string> {
  // The reference types it Option<HashMap<String, String>>, so null means absent.
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw invalid(`${METADATA_KEY} must be an object mapping strings to strings`, file);
  const entries = Object.entries(v);
  for (const [k, value] of entries) {
    if (typeof value !== 'string') throw invalid(`${METADATA_KEY}.${k} must be a string, got ${JSON.stringify(value)}`, file);
  }
  // fromEntries defines, not assigns: a key "__proto__" (any string is a key to the reference's
  // HashMap) stays an entry, as JSON.parse made it, instead of vanishing into the prototype setter.
  return Object.fromEntries(entries) as Record<string, string>;
}

interface Located {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  begin: number;
  end: number;
}

function parseEntry(name: string, v: unknown, file: string): Located {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid('tensor entry must be an object with dtype, shape and data_offsets', file, name);
  const e = v as Record<string, unknown>;
  const keys = Object.keys(e).sort();
  if (keys.length !== ENTRY_KEYS.length || keys.some((k, i) => k !== ENTRY_KEYS[i])) {
    throw invalid(`tensor entry must have exactly dtype, shape and data_offsets, got ${JSON.stringify(keys)}`, file, name);
  }
  if (!isSafetensorsDtype(e.dtype)) {
    throw invalid(`dtype ${JSON.stringify(e.dtype)} is not a safetensors dtype (${DTYPE_ORDER.join(', ')})`, file, name);
  }
  const count = elementCount(e.shape, file, name);
  const offsets = e.data_offsets;
  if (
    !Array.isArray(offsets) ||
    offsets.length !== 2 ||
    !offsets.every((o) => typeof o === 'number' && Number.isSafeInteger(o) && o >= 0) ||
    (offsets[0] as number) > (offsets[1] as number)
  ) {
    throw invalid(`data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offsets)}`, file, name);
  }
  const [begin, end] = offsets as [number, number];
  const bytes = count * SAFETENSORS_DTYPE_SIZES[e.dtype];
  if (!Number.isSafeInteger(bytes)) throw invalid(`shape ${JSON.stringify(e.shape)} is too large`, file, name);
  if (end - begin !== bytes) {
    throw invalid(`data_offsets [${begin}, ${end}] span ${end - begin} bytes but ${e.dtype} ${JSON.stringify(e.shape)} needs ${bytes}`, file, name);
  }
  return { name, dtype: e.dtype, shape: e.shape as number[], begin, end };
}

/** Checks every entry and that the entries tile a data buffer of `dataLength` bytes exactly. */
function layoutOf(header: Record<string, unknown>, dataLength: number, file: string): { metadata: Record<string, string>; entries: Located[] } {
  const metadata = parseMetadata(header[METADATA_KEY], file);
  const entries: Located[] = [];
  for (const [name, v] of Object.entries(header)) {
    if (name !== METADATA_KEY) entries.push(parseEntry(name, v, file));
  }
  // Sorted by offsets, each tensor must start where the last ended: no overlap, no hole.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let covered = 0;
  let previous: Located | undefined;
  for (const t of entries) {
    if (t.begin < covered) {
      throw invalid(`data_offsets [${t.begin}, ${t.end}] overlap tensor ${previous?.name} ending at ${covered}`, file, t.name);
    }
    if (t.begin > covered) throw invalid(`bytes [${covered}, ${t.begin}) of the data buffer belong to no tensor`, file, t.name);
    covered = t.end;
    previous = t;
  }
  if (covered > dataLength) {
    throw new ModelError('TANDEM_SAFETENSORS_TRUNCATED', `data ends at byte ${covered} but the data buffer holds ${dataLength} bytes`, { file, tensor: previous?.name });
  }
  if (covered < dataLength) throw invalid(`${dataLength - covered} trailing bytes after the last tensor belong to no tensor`, file);
  return { metadata, entries };
}

export interface ParseSafetensorsOptions {
  /**
   * Tensors the header may name, counted in the linear pass before JSON.parse: parsing and
   * checking cost ~8 µs a tensor (a 38 MB header of 300,000 took 2.3 s), so a file from a
   * tenant is bounded by what it can hold (MAX_ADAPTER_TENSORS for an adapter). Unbounded by default.
   */
  maxTensors?: number;
}

/**
 * Parses a whole safetensors file held in memory. Tensor data are views into `bytes`.
 * `file` is only used to name the file in errors.
 */
export function parseSafetensors(bytes: Uint8Array, file: string, options: ParseSafetensorsOptions = {}): SafetensorsContents {
  const headerLength = headerLengthOf(bytes, bytes.byteLength, file);
  const dataStart = 8 + headerLength;
  const header = parseHeaderText(bytes.subarray(8, dataStart), file, options.maxTensors);
  const { metadata, entries } = layoutOf(header, bytes.byteLength - dataStart, file);
  const tensors = new Map<string, SafetensorsTensor>();
  for (const t of entries) {
    tensors.set(t.name, { dtype: t.dtype, shape: t.shape, data: bytes.subarray(dataStart + t.begin, dataStart + t.end) });
  }
  return { metadata, tensors };
}

function bytesOf(data: ArrayBufferView): Uint8Array {
  return data instanceof Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** Byte-wise UTF-8 order, as Rust's `String` compares. */
function compareNames(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/** A tensor as a safetensors header describes it: no data yet. */
export interface SafetensorsEntryInput {
  dtype: SafetensorsDtype;
  shape: readonly number[];
}

/** Where serializeSafetensors would put each tensor, and the file's first bytes. */
export interface SafetensorsLayout {
  /** The length prefix, the JSON header and its padding: the file's first `head.byteLength` bytes. */
  head: Uint8Array;
  /** Each tensor's data, [begin, end) counted from the end of the head, in the file's order. */
  offsets: Map<string, readonly [number, number]>;
  /** The whole file's size in bytes. */
  byteLength: number;
}

/**
 * The layout serializeSafetensors writes, from the tensors' dtypes and shapes alone: tensors
 * sorted by dtype (widest first, so each is aligned to its element size) and then by name; the
 * header padded with spaces so the data starts 8-byte aligned; `__metadata__` written only when
 * given. A caller that has the data elsewhere can write (or stream, or hash) a file tensor by
 * tensor without holding it whole.
 */
export function safetensorsLayout(
  entries: ReadonlyMap<string, SafetensorsEntryInput> | Readonly<Record<string, SafetensorsEntryInput>>,
  metadata?: Readonly<Record<string, string>>,
): SafetensorsLayout {
  const list: [string, SafetensorsEntryInput, number][] = [];
  const named: Iterable<[string, SafetensorsEntryInput]> = entries instanceof Map ? (entries as ReadonlyMap<string, SafetensorsEntryInput>).entries() : Object.entries(entries);
  for (const [name, t] of named) {
    if (name === METADATA_KEY) throw new ModelError('TANDEM_INPUT_INVALID', `${METADATA_KEY} is reserved and cannot name a tensor`, { tensor: name });
    if (!isSafetensorsDtype(t.dtype)) throw new ModelError('TANDEM_INPUT_INVALID', `dtype ${JSON.stringify(t.dtype)} is not a safetensors dtype`, { tensor: name });
    let count: number;
    try {
      count = elementCount(t.shape, '<serialize>', name);
    } catch (cause) {
      throw new ModelError('TANDEM_INPUT_INVALID', `shape ${JSON.stringify(t.shape)} is not a list of non-negative integers`, { tensor: name, cause });
    }
    list.push([name, t, count * SAFETENSORS_DTYPE_SIZES[t.dtype]]);
  }
  list.sort(([an, a], [bn, b]) => DTYPE_ORDER.indexOf(b.dtype) - DTYPE_ORDER.indexOf(a.dtype) || compareNames(an, bn));
  const header: [string, unknown][] = [];
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new ModelError('TANDEM_INPUT_INVALID', `metadata value ${k} must be a string`, { field: `${METADATA_KEY}.${k}` });
    }
    header.push([METADATA_KEY, metadata]);
  }
  const offsets = new Map<string, readonly [number, number]>();
  let offset = 0;
  for (const [name, t, bytes] of list) {
    header.push([name, { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + bytes] }]);
    offsets.set(name, [offset, offset + bytes]);
    offset += bytes;
  }
  // fromEntries defines, not assigns: a tensor named "__proto__" is an entry like any other.
  const json = Buffer.from(JSON.stringify(Object.fromEntries(header)), 'utf8');
  const headerLength = Math.ceil(json.byteLength / 8) * 8;
  if (headerLength > SAFETENSORS_MAX_HEADER_BYTES) throw new ModelError('TANDEM_INPUT_INVALID', `header of ${headerLength} bytes exceeds the safetensors limit`);
  const head = new Uint8Array(8 + headerLength);
  new DataView(head.buffer).setBigUint64(0, BigInt(headerLength), true);
  head.set(json, 8);
  head.fill(0x20, 8 + json.byteLength);
  return { head, offsets, byteLength: head.byteLength + offset };
}

/** Serializes tensors the way the reference does (the layout is safetensorsLayout's). */
export function serializeSafetensors(tensors: SafetensorsTensorsInput, metadata?: Readonly<Record<string, string>>): Uint8Array {
  const byName = new Map<string, SafetensorsTensorInput>(tensors instanceof Map ? tensors : Object.entries(tensors));
  const layout = safetensorsLayout(byName, metadata);
  for (const [name, t] of byName) {
    const [begin, end] = layout.offsets.get(name) as readonly [number, number];
    if (t.data.byteLength !== end - begin) {
      throw new ModelError('TANDEM_INPUT_INVALID', `${t.dtype} ${JSON.stringify(t.shape)} needs ${end - begin} bytes, the data holds ${t.data.byteLength}`, { tensor: name });
    }
  }
  const out = new Uint8Array(layout.byteLength);
  out.set(layout.head);
  for (const [name, [begin]] of layout.offsets) out.set(bytesOf((byName.get(name) as SafetensorsTensorInput).data), layout.head.byteLength + begin);
  return out;
}

export interface ReadSafetensorsOptions extends ParseSafetensorsOptions {
  /**
   * Files up to this size are read in one piece and tensors are views into it; larger ones
   * are read tensor by tensor (fs.readFile stops at 2 GiB; real shards reach 5 GB). 1 GiB by default.
   */
  maxWholeFileBytes?: number;
}

function fsError(cause: unknown, path: string, verb: 'read' | 'written'): ModelError {
  const code = (cause as NodeJS.ErrnoException).code;
  if (code === 'ENOENT' && verb === 'read') return new ModelError('TANDEM_MODEL_FILE_MISSING', 'the file does not exist', { file: path, cause });
  return new ModelError(verb === 'read' ? 'TANDEM_MODEL_FILE_UNREADABLE' : 'TANDEM_MODEL_FILE_UNWRITABLE', `the file could not be ${verb} (${code ?? String(cause)})`, {
    file: path,
    cause,
  });
}

/**
 * The size of `path` when it is a regular file. Opening a named pipe blocks until a writer comes
 * (a thread of libuv's pool with it), and /dev/zero reads without end: both are refused here.
 */
async function regularFileSize(path: string): Promise<number> {
  let info: Awaited<ReturnType<typeof stat>>;
  try {
    info = await stat(path);
  } catch (cause) {
    throw fsError(cause, path, 'read');
  }
  if (!info.isFile()) throw new ModelError('TANDEM_MODEL_FILE_UNREADABLE', 'it is not a regular file', { file: path });
  return info.size;
}

async function openForReading(path: string): Promise<FileHandle> {
  await regularFileSize(path);
  try {
    return await open(path, 'r');
  } catch (cause) {
    throw fsError(cause, path, 'read');
  }
}

/**
 * Reads the length and the header of an open file of `size` bytes, and checks them as
 * parseSafetensors does (length limit, nesting depth, layout), the data buffer being what
 * follows the header up to `size`. Only the 8 + N header bytes are read.
 */
async function readHeaderOf(fh: FileHandle, size: number, path: string, maxTensors?: number): Promise<{ dataStart: number; metadata: Record<string, string>; entries: Located[] }> {
  const prefix = new Uint8Array(Math.min(8, size));
  await readExactly(fh, prefix, 0, path);
  const headerLength = headerLengthOf(prefix, size, path);
  const headerBytes = new Uint8Array(headerLength);
  await readExactly(fh, headerBytes, 8, path);
  const dataStart = 8 + headerLength;
  return { dataStart, ...layoutOf(parseHeaderText(headerBytes, path, maxTensors), size - dataStart, path) };
}

/** A safetensors file's header: its metadata and each tensor's dtype and shape, without the data. */
export interface SafetensorsHeader {
  metadata: Record<string, string>;
  tensors: Map<string, { dtype: SafetensorsDtype; shape: number[] }>;
}

/**
 * Reads only the header of a safetensors file and checks it as readSafetensorsFile would, the
 * tensors tiling the rest of the file exactly (its size from fstat). For comparing a file with
 * what it should hold before paying for its data.
 */
export async function readSafetensorsHeader(path: string, options: ParseSafetensorsOptions = {}): Promise<SafetensorsHeader> {
  const fh = await openForReading(path);
  try {
    const { metadata, entries } = await readHeaderOf(fh, (await fh.stat()).size, path, options.maxTensors);
    return { metadata, tensors: new Map(entries.map((t) => [t.name, { dtype: t.dtype, shape: t.shape }])) };
  } finally {
    await fh.close();
  }
}

/** Reads and parses a safetensors file; a missing file is TANDEM_MODEL_FILE_MISSING naming it. */
export async function readSafetensorsFile(path: string, options: ReadSafetensorsOptions = {}): Promise<SafetensorsContents> {
  const fh = await openForReading(path);
  try {
    const size = (await fh.stat()).size;
    if (size <= (options.maxWholeFileBytes ?? 2 ** 30)) {
      const whole = new Uint8Array(size);
      await readExactly(fh, whole, 0, path);
      return parseSafetensors(whole, path, options);
    }
    const { dataStart, metadata, entries } = await readHeaderOf(fh, size, path, options.maxTensors);
    const tensors = new Map<string, SafetensorsTensor>();
    for (const t of entries) {
      // Each tensor gets its own buffer, so every one starts aligned.
      const data = new Uint8Array(t.end - t.begin);
      await readExactly(fh, data, dataStart + t.begin, path);
      tensors.set(t.name, { dtype: t.dtype, shape: t.shape, data });
    }
    return { metadata, tensors };
  } finally {
    await fh.close();
  }
}

async function readExactly(fh: FileHandle, into: Uint8Array, position: number, path: string): Promise<void> {
  let done = 0;
  while (done < into.byteLength) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await fh.read(into, done, Math.min(into.byteLength - done, 2 ** 30), position + done));
    } catch (cause) {
      throw fsError(cause, path, 'read');
    }
    if (bytesRead === 0) throw new ModelError('TANDEM_SAFETENSORS_TRUNCATED', `the file ended while reading (it changed while being read?)`, { file: path });
    done += bytesRead;
  }
}

/**
 * Reads a file a model needs, turning the filesystem's errors into typed ones naming the file:
 * only a regular file of at most `maxBytes` is read.
 */
export async function readModelFile(path: string, maxBytes: number): Promise<Uint8Array> {
  const size = await regularFileSize(path);
  if (size > maxBytes) throw new ModelError('TANDEM_MODEL_FILE_UNREADABLE', `it holds ${size} bytes, over the limit of ${maxBytes} for this file`, { file: path });
  try {
    const buf = await readFile(path);
    return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  } catch (cause) {
    throw fsError(cause, path, 'read');
  }
}

/**
 * Writes bytes to `path` so that a crash never leaves a half-written file: a temporary
 * sibling is written and flushed, then renamed over `path` (atomic on POSIX filesystems).
 */
export async function writeFileAtomic(path: string, bytes: Uint8Array | string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await open(tmp, 'w');
    try {
      await fh.writeFile(bytes);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (cause) {
    await rm(tmp, { force: true });
    throw fsError(cause, path, 'written');
  }
  // Make the rename itself durable; not every platform lets a directory be fsynced.
  try {
    const dh = await open(dirname(path), 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  } catch {
    // best effort
  }
}

/** Serializes and writes a safetensors file atomically (temporary file, then rename). */
export async function writeSafetensorsFile(path: string, tensors: SafetensorsTensorsInput, metadata?: Readonly<Record<string, string>>): Promise<void> {
  await writeFileAtomic(path, serializeSafetensors(tensors, metadata));
}

// ---- float conversions -------------------------------------------------------------

let halfTable: Float32Array | undefined;

/** IEEE 754 binary16 to a number: subnormals, signed zeros, infinities and NaN included. */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

function getHalfTable(): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) halfTable[h] = halfToFloat(h);
  }
  return halfTable;
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** float32 to binary16 bits, rounding to nearest even; overflow gives infinity, NaN stays NaN. */
export function floatToHalf(value: number): number {
  f32Scratch[0] = value;
  const u = u32Scratch[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa correctly bumps the exponent, up to infinity.
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}

/** float32 to bfloat16 bits (the upper half of the float32), rounding to nearest even. */
export function floatToBfloat16(value: number): number {
  f32Scratch[0] = value;
  const u = u32Scratch[0];
  if ((u & 0x7f800000) === 0x7f800000 && u & 0x7fffff) return (u >>> 16) | 0x40;
  return (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
}

/** An aligned typed view when possible; otherwise a copy (Node's Buffer pool can hand out odd offsets). */
function alignedBytes(data: Uint8Array, align: number): Uint8Array {
  return data.byteOffset % align === 0 ? data : data.slice();
}

function assertLittleEndianHost(file: string, name: string): void {
  if (!HOST_IS_LITTLE_ENDIAN) throw new ModelError('TANDEM_TENSOR_DTYPE_UNSUPPORTED', 'tensors can only be decoded on a little-endian host', { file, tensor: name });
}

/**
 * The tensor's values as float32. F32 data come back as a view sharing memory with
 * `entry.data` when aligned; F16, BF16 and F64 are converted into a new array.
 * Any other dtype is TANDEM_TENSOR_DTYPE_UNSUPPORTED naming the file and tensor.
 */
export function toFloat32(entry: SafetensorsTensor, file: string, name: string): Float32Array {
  assertLittleEndianHost(file, name);
  const { dtype, data } = entry;
  switch (dtype) {
    case 'F32': {
      const b = alignedBytes(data, 4);
      return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
    }
    case 'F64': {
      const b = alignedBytes(data, 8);
      return Float32Array.from(new Float64Array(b.buffer, b.byteOffset, b.byteLength / 8));
    }
    case 'F16': {
      const b = alignedBytes(data, 2);
      const src = new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
      const table = getHalfTable();
      const out = new Float32Array(src.length);
      for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
      return out;
    }
    case 'BF16': {
      const b = alignedBytes(data, 2);
      const src = new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
      const out = new Float32Array(src.length);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
      return out;
    }
    default:
      throw new ModelError('TANDEM_TENSOR_DTYPE_UNSUPPORTED', `dtype ${dtype} cannot be loaded as floating point weights (F32, F16, BF16, F64)`, { file, tensor: name });
  }
}

export type FloatDtype = 'F32' | 'F16' | 'BF16' | 'F64';

/** Encodes float32 values as the little-endian bytes of a floating point dtype, ready to write. */
export function fromFloat32(values: Float32Array, dtype: FloatDtype): Uint8Array {
  assertLittleEndianHost('<encode>', '<values>');
  switch (dtype) {
    case 'F32':
      return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
    case 'F64':
      return new Uint8Array(Float64Array.from(values).buffer);
    case 'F16':
    case 'BF16': {
      const out = new Uint16Array(values.length);
      const encode = dtype === 'F16' ? floatToHalf : floatToBfloat16;
      for (let i = 0; i < values.length; i++) out[i] = encode(values[i]);
      return new Uint8Array(out.buffer);
    }
    default:
      throw new ModelError('TANDEM_INPUT_INVALID', `cannot encode float32 values as ${String(dtype)}`);
  }
}
