// What gateways and workers say to each other over NATS: subjects, msgpackr bodies, tracing
// headers. Every body is checked when it arrives (a NATS subject is a network input like any
// other), before a tensor is copied or computed on.
import { headers as natsHeaders } from '@nats-io/transport-node';
import type { MsgHdrs } from '@nats-io/transport-node';
import { Packr } from 'msgpackr';
import type { HeldLora } from '../middle-compute.ts';
import type { BlockRange, Shape3 } from '../middle-runner.ts';
import { DEFAULT_LIMITS, decodeFrame, decodeTensor, encodeFrame } from '../../protocol/index.ts';
import type { TensorFrame } from '../../protocol/index.ts';
import { ClusterError } from './errors.ts';

const packr = new Packr({ useRecords: false });

/** A model's token in subjects: the first 16 hex digits of its content hash. */
export function modelToken(contentHash: string): string {
  return contentHash.replace(/^sha256:/, '').slice(0, 16);
}

/** The queue group subject of the workers owning `owner` of a model: any of them answers. */
export function rangeSubject(contentHash: string, owner: BlockRange): string {
  return `tandem.middle.${modelToken(contentHash)}.${owner.start}-${owner.end}`;
}

/** One worker's own subject: the backwards from the tapes it keeps. */
export function workerSubject(workerId: string): string {
  return `tandem.middle.worker.${workerId}`;
}

/**
 * A worker claims a request on receipt, publishing `{id, worker}` to the subject in
 * CLAIM_TO_HEADER: the gateway then waits for that worker as long as it keeps announcing
 * itself, and asks the range again as soon as it goes silent.
 */
export const CLAIMS_PREFIX = 'tandem.claims.';
export const CLAIM_TO_HEADER = 'tandem-claim-to';
export const CLAIM_ID_HEADER = 'tandem-claim-id';
const CLAIM_SUBJECT = /^tandem\.claims\.[A-Za-z0-9]{1,64}$/;

/**
 * How long the gateway waits for this request's reply from when it sends it (ms): a worker drops
 * the request unrun if it is still queued then, since nobody is waiting for its answer (after a
 * failover the new worker would otherwise compute every abandoned request before the live ones).
 */
export const WAIT_HEADER = 'tandem-wait-ms';
/** The longest wait a request may state: the gateway's own request deadline is 25 s. */
const MAX_WAIT_MS = 10 * 60_000;

/** The wait a request states, when it is a whole number of ms in (0, 10 min]. */
export function waitOf(h: MsgHdrs | undefined): number | undefined {
  const text = h?.get(WAIT_HEADER) ?? '';
  if (!/^\d{1,9}$/.test(text)) return undefined;
  const ms = Number(text);
  return ms > 0 && ms <= MAX_WAIT_MS ? ms : undefined;
}

/** The claim subject and id a request asks for, when both are well formed. */
export function claimOf(h: MsgHdrs | undefined): { to: string; id: string } | undefined {
  if (h === undefined || !h.has(CLAIM_TO_HEADER) || !h.has(CLAIM_ID_HEADER)) return undefined;
  const to = h.get(CLAIM_TO_HEADER);
  const id = h.get(CLAIM_ID_HEADER);
  return CLAIM_SUBJECT.test(to) && /^[A-Za-z0-9]{1,64}$/.test(id) ? { to, id } : undefined;
}

/** Where workers announce themselves (WorkerStatus, about every second). */
export const ANNOUNCE_SUBJECT = 'tandem.cluster.workers';

/** A worker id usable as a subject token. */
export function safeWorkerId(text: string): string {
  return text.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 96);
}

/**
 * `hFrame` and `gFrame`: the frame `h` or `g` was decoded from at the gateway (an edge's
 * int8-block h_B, its f16 g_M), sent in place of the float32 values; the worker decodes it
 * into the same values. Absent, the float32 values travel.
 */
export type MiddleRequest =
  | { op: 'forward'; blocks: BlockRange; shape: Shape3; h: Float32Array; hFrame?: TensorFrame; keepTape: boolean; lora?: HeldLora }
  | { op: 'backward'; blocks: BlockRange; shape: Shape3; h: Float32Array; g: Float32Array; hFrame?: TensorFrame; gFrame?: TensorFrame; lora?: HeldLora }
  | { op: 'backwardFromTape'; tapeId: number; shape: Shape3; g: Float32Array; gFrame?: TensorFrame }
  | { op: 'dropTape'; tapeId: number };

export type MiddleReply =
  /** `loraGrads`: a backward with a held adapter's factors answers their gradients too (A then B of each module, then each (IA)^3 scale). */
  | { ok: true; worker: string; output: Float32Array; tapeId?: number; savedBytes?: number; computeMs: number; loraGrads?: Float32Array[] }
  /** tapeLost: this worker does not keep that tape (recompute); failed: the computation failed. */
  | { ok: false; worker: string; kind: 'tapeLost' | 'failed' | 'invalid'; message: string; code?: string };

/** Tracing: the request, the session and the tenant travel as NATS headers. */
export interface Trace {
  requestId?: string;
  session?: string;
  tenant?: string;
}

export function traceHeaders(trace: Trace): MsgHdrs {
  const h = natsHeaders();
  if (trace.requestId !== undefined) h.set('tandem-request-id', trace.requestId.slice(0, 256));
  if (trace.session !== undefined) h.set('tandem-session', trace.session.slice(0, 128));
  if (trace.tenant !== undefined && trace.tenant !== '') h.set('tandem-tenant', trace.tenant.slice(0, 128));
  return h;
}

export function traceOf(h: MsgHdrs | undefined): Trace {
  if (h === undefined) return {};
  const get = (k: string): string | undefined => (h.has(k) ? h.get(k) : undefined);
  return { requestId: get('tandem-request-id'), session: get('tandem-session'), tenant: get('tandem-tenant') };
}

function bytesOf(f: Float32Array): Uint8Array {
  return new Uint8Array(f.buffer, f.byteOffset, f.byteLength);
}

function packTensors<T extends object>(value: T): Uint8Array {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = v instanceof Float32Array ? bytesOf(v) : v;
  return packr.pack(out);
}

/** A held adapter's factors as they cross: each tensor as its float32 bytes. */
function packLora(lora: HeldLora): Record<string, unknown> {
  return {
    scale: lora.scale,
    modules: lora.modules.map((m) => ({ path: m.path, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures, a: bytesOf(m.a), b: bytesOf(m.b) })),
    ...(lora.ia3 === undefined ? {} : { ia3: lora.ia3.map((m) => ({ path: m.path, feedforward: m.feedforward, scale: bytesOf(m.scale) })) }),
  };
}

export function encodeRequest(request: MiddleRequest): Uint8Array {
  const { hFrame, gFrame, lora, ...rest } = request as MiddleRequest & { hFrame?: TensorFrame; gFrame?: TensorFrame; lora?: HeldLora };
  const out: Record<string, unknown> = { ...rest };
  if (lora !== undefined) out.lora = packLora(lora);
  // A frame travels in place of its values (encoded as the protocol encodes it).
  if (hFrame !== undefined) {
    delete out.h;
    out.hFrame = encodeFrame(hFrame);
  }
  if (gFrame !== undefined) {
    delete out.g;
    out.gFrame = encodeFrame(gFrame);
  }
  return packTensors(out);
}

export function encodeReply(reply: MiddleReply): Uint8Array {
  if (!reply.ok || reply.loraGrads === undefined) return packTensors(reply);
  return packTensors({ ...reply, loraGrads: reply.loraGrads.map(bytesOf) });
}

function invalid(field: string, reason: string): ClusterError {
  return new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field, reason });
}

function record(bytes: Uint8Array, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = packr.unpack(bytes);
  } catch (cause) {
    throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: what, reason: `not msgpack: ${(cause as Error).message.slice(0, 80)}` });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw invalid(what, 'not a map');
  return value as Record<string, unknown>;
}

/** A field's value for a message: a map or an array is named, not converted (its toString may be a key of the body's). */
function shown(value: unknown): string {
  if (typeof value === 'object' && value !== null) return Array.isArray(value) ? '(an array)' : '(a map)';
  return JSON.stringify(String(value).slice(0, 32));
}

function int(value: unknown, field: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) throw invalid(field, `must be an integer in [${min}, ${max}]`);
  return value;
}

function blocksOf(value: unknown): BlockRange {
  if (typeof value !== 'object' || value === null) throw invalid('blocks', 'not a {start, end} map');
  const { start, end } = value as Record<string, unknown>;
  const s = int(start, 'blocks.start', 0, 65535);
  const e = int(end, 'blocks.end', s + 1, 65536);
  return { start: s, end: e };
}

function shapeOf(value: unknown, maxElements: number): Shape3 {
  if (!Array.isArray(value) || value.length !== 3) throw invalid('shape', 'must be [batch, seq, hidden]');
  const shape = value.map((d, i) => int(d, `shape[${i}]`, 1, maxElements)) as Shape3;
  if (shape[0] * shape[1] * shape[2] > maxElements) throw invalid('shape', `holds ${shape[0] * shape[1] * shape[2]} elements; the limit is ${maxElements}`);
  return shape;
}

/** A float32 tensor of exactly `elements` values, copied into its own aligned buffer. */
function tensorOf(value: unknown, field: string, elements: number): Float32Array {
  if (!(value instanceof Uint8Array)) throw invalid(field, 'not bytes');
  if (value.byteLength !== elements * 4) throw invalid(field, `holds ${value.byteLength} bytes; the shape needs ${elements * 4}`);
  const out = new Float32Array(elements);
  new Uint8Array(out.buffer).set(value);
  return out;
}

/**
 * The values of tensor `field`: its float32 bytes, or the frame in `${field}Frame` decoded (the
 * frame's shape must be the request's; the limits bound it before anything is decoded; the
 * gateway has applied the session's policy on non-finite values to these same values).
 */
function valuesOf(r: Record<string, unknown>, field: 'h' | 'g', shape: Shape3, maxElements: number): Float32Array {
  const elements = shape[0] * shape[1] * shape[2];
  const framed = r[`${field}Frame`];
  if (framed === undefined) return tensorOf(r[field], field, elements);
  if (!(framed instanceof Uint8Array)) throw invalid(`${field}Frame`, 'not bytes');
  try {
    // No codec's frame is larger than the float32 values themselves, its parameters and protobuf's framing aside.
    const maxBytes = elements * 4 + FRAME_OVERHEAD_BYTES;
    const limits = { ...DEFAULT_LIMITS, maxElements, maxFrameBytes: maxBytes };
    return decodeTensor(decodeFrame(framed, maxBytes, `${field}Frame`), { shape, limits, allowNonFinite: true, field: `${field}Frame` });
  } catch (cause) {
    if (cause instanceof ClusterError) throw cause;
    throw invalid(`${field}Frame`, (cause as Error).message.slice(0, 200));
  }
}

/** The most modules a held adapter names on the blocks of one request (7 linear modules of 256 blocks). */
const MAX_HELD_MODULES = 7 * 256;
/** The largest rank, and in- or out-features, of a held module that crosses. */
const MAX_HELD_RANK = 1024;
const MAX_HELD_FEATURES = 1 << 20;
const HELD_PATH = /^model\.layers\.\d{1,5}\.(self_attn|mlp)\.[a-z_]{1,32}$/;

/**
 * A held adapter's factors: counts, paths and sizes bounded, every tensor's bytes matching its
 * stated shape, together at most `maxElements` values; the worker checks paths and shapes
 * against its own blocks' weights before anything computes.
 */
function loraOf(value: unknown, maxElements: number): HeldLora {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw invalid('lora', 'not a map');
  const r = value as Record<string, unknown>;
  if (typeof r.scale !== 'number' || !Number.isFinite(r.scale)) throw invalid('lora.scale', 'must be a finite number');
  const list = (field: 'modules' | 'ia3'): Record<string, unknown>[] => {
    const v = r[field] ?? [];
    if (!Array.isArray(v) || v.length > MAX_HELD_MODULES) throw invalid(`lora.${field}`, `must be a list of at most ${MAX_HELD_MODULES}`);
    return v.map((m, i) => {
      if (typeof m !== 'object' || m === null || Array.isArray(m)) throw invalid(`lora.${field}[${i}]`, 'not a map');
      const path = (m as Record<string, unknown>).path;
      if (typeof path !== 'string' || !HELD_PATH.test(path)) throw invalid(`lora.${field}[${i}].path`, 'not a module path model.layers.<i>.<self_attn|mlp>.<name>');
      return m as Record<string, unknown>;
    });
  };
  let budget = maxElements;
  const tensor = (v: unknown, field: string, elements: number): Float32Array => {
    budget -= elements;
    if (budget < 0) throw invalid('lora', `its tensors hold more than ${maxElements} values`);
    return tensorOf(v, field, elements);
  };
  const modules = list('modules').map((m, i) => {
    const at = `lora.modules[${i}]`;
    const rank = int(m.r, `${at}.r`, 1, MAX_HELD_RANK);
    const inFeatures = int(m.inFeatures, `${at}.inFeatures`, 1, MAX_HELD_FEATURES);
    const outFeatures = int(m.outFeatures, `${at}.outFeatures`, 1, MAX_HELD_FEATURES);
    return { path: m.path as string, r: rank, inFeatures, outFeatures, a: tensor(m.a, `${at}.a`, rank * inFeatures), b: tensor(m.b, `${at}.b`, outFeatures * rank) };
  });
  const ia3Raw = r.ia3 === undefined ? undefined : list('ia3');
  const ia3 = ia3Raw?.map((m, i) => {
    const scale = m.scale;
    if (!(scale instanceof Uint8Array) || scale.byteLength % 4 !== 0 || scale.byteLength === 0) throw invalid(`lora.ia3[${i}].scale`, 'not float32 bytes');
    return { path: m.path as string, feedforward: m.feedforward === true, scale: tensor(scale, `lora.ia3[${i}].scale`, scale.byteLength / 4) };
  });
  if (modules.length + (ia3?.length ?? 0) === 0) throw invalid('lora', 'names no module');
  if (modules.length > 0 && (ia3?.length ?? 0) > 0) throw invalid('lora', 'holds LoRA factors and (IA)^3 scales together');
  return { scale: r.scale, modules, ...(ia3 === undefined ? {} : { ia3 }) };
}

/** Room in a frame for its codec's parameters (scales, indices) and protobuf's framing beyond float32 values. */
const FRAME_OVERHEAD_BYTES = 64 * 1024;

/** A request a worker received; `maxElements` bounds every tensor before it is copied. */
export function decodeRequest(bytes: Uint8Array, maxElements: number): MiddleRequest {
  const r = record(bytes, 'request');
  switch (r.op) {
    case 'forward': {
      const shape = shapeOf(r.shape, maxElements);
      const lora = r.lora === undefined ? undefined : loraOf(r.lora, maxElements);
      // A held adapter's forward keeps no tape: its backward recomputes with the factors of then.
      if (lora !== undefined && r.keepTape === true) throw invalid('keepTape', 'a forward with a held adapter keeps no tape');
      return { op: 'forward', blocks: blocksOf(r.blocks), shape, h: valuesOf(r, 'h', shape, maxElements), keepTape: r.keepTape === true, ...(lora === undefined ? {} : { lora }) };
    }
    case 'backward': {
      const shape = shapeOf(r.shape, maxElements);
      const lora = r.lora === undefined ? undefined : loraOf(r.lora, maxElements);
      return { op: 'backward', blocks: blocksOf(r.blocks), shape, h: valuesOf(r, 'h', shape, maxElements), g: valuesOf(r, 'g', shape, maxElements), ...(lora === undefined ? {} : { lora }) };
    }
    case 'backwardFromTape': {
      const shape = shapeOf(r.shape, maxElements);
      return { op: 'backwardFromTape', tapeId: int(r.tapeId, 'tapeId', 1, Number.MAX_SAFE_INTEGER), shape, g: valuesOf(r, 'g', shape, maxElements) };
    }
    case 'dropTape':
      return { op: 'dropTape', tapeId: int(r.tapeId, 'tapeId', 1, Number.MAX_SAFE_INTEGER) };
    default:
      throw invalid('op', `unknown op ${shown(r.op)}`);
  }
}

/**
 * A reply the gateway received; the output must hold `elements` values, and the gradients of a
 * held adapter's backward one tensor of each length of `loraLengths`.
 */
export function decodeReply(bytes: Uint8Array, elements: number, loraLengths?: readonly number[]): MiddleReply {
  const r = record(bytes, 'reply');
  const worker = typeof r.worker === 'string' ? r.worker.slice(0, 128) : '';
  if (r.ok === true) {
    let loraGrads: Float32Array[] | undefined;
    if (loraLengths !== undefined) {
      if (!Array.isArray(r.loraGrads) || r.loraGrads.length !== loraLengths.length) throw invalid('loraGrads', `must be a list of ${loraLengths.length} tensors`);
      loraGrads = loraLengths.map((n, i) => tensorOf((r.loraGrads as unknown[])[i], `loraGrads[${i}]`, n));
    }
    return {
      ...(loraGrads === undefined ? {} : { loraGrads }),
      ok: true, worker, output: tensorOf(r.output, 'output', elements), computeMs: typeof r.computeMs === 'number' ? r.computeMs : 0,
      tapeId: r.tapeId === undefined ? undefined : int(r.tapeId, 'tapeId', 1, Number.MAX_SAFE_INTEGER),
      savedBytes: r.savedBytes === undefined ? undefined : int(r.savedBytes, 'savedBytes', 0, Number.MAX_SAFE_INTEGER),
    };
  }
  const kind = r.kind === 'tapeLost' || r.kind === 'invalid' ? r.kind : 'failed';
  return { ok: false, worker, kind, message: typeof r.message === 'string' ? r.message.slice(0, 500) : '', code: typeof r.code === 'string' ? r.code.slice(0, 64) : undefined };
}
