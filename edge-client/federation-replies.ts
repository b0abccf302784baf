// The federation coordinator's replies as the edge reads them: a cloud is not trusted with
// them. Every field federate.ts uses is checked as it arrives (TANDEM_EDGE_RESPONSE_INVALID
// naming the field and its limit): the round and attempt name folders, the global adapter is
// decoded only once its config is planned against the owner's model and its tensors match.
import { constants as bufferConstants } from 'node:buffer';
import { ADAPTER_CONFIG_MAX_BYTES, MAX_ADAPTER_TENSORS, ModelError, checkAdapterWeights, planAdapter } from '../model/index.ts';
import type { LlamaModel } from '../model/index.ts';
import { FEDERATION_AGGREGATIONS, FEDERATION_MODES, MAX_LOCAL_STEPS, MAX_ROUND_DEADLINE_SECONDS, SECAGG_PHASES, decodeFloat32 } from '../protocol/index.ts';
import type { FederationStatus, RoundAssignment, RoundRecord, RoundUpdateAck, SecAggView, WireAdapter } from '../protocol/index.ts';
import { isObject } from './download.ts';
import { EdgeError } from './errors.ts';

/**
 * A round's reply carries the global adapter, which only the model it trains on bounds (the
 * plan's allocation limit, checked once the model is known and before a value is decoded): the
 * reply is held to the longest string Node can parse at all.
 */
export const MAX_ROUND_REPLY_BYTES = bufferConstants.MAX_STRING_LENGTH;

/**
 * A SecAgg view holds, per sampled owner, its advertised keys (two 44-character keys), the share
 * box it addressed to this owner (SecAggOwner opens none of 8192 characters or more) and its name
 * in `sampled` and `survivors`: 16 KiB an owner holds all of it twice over.
 */
export const SECAGG_VIEW_BYTES_PER_OWNER = 16 * 1024;

/** A federation's status holds a record per completed round (a few hundred bytes for a handful of owners): 64 MiB is 10,000 rounds of a hundred owners. */
export const MAX_STATUS_REPLY_BYTES = 64 * 1024 * 1024;

/** The metadata the global adapter's weights file is written with, and planned under. */
export const GLOBAL_METADATA = { format: 'pt' };

export const ROUND_STATES = ['open', 'done', 'stopped'] as const satisfies readonly RoundAssignment['state'][];

/** A value for an error message: a primitive as JSON, cut to a few dozen characters. */
function shown(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (typeof v === 'object') return v === null ? 'null' : Array.isArray(v) ? 'an array' : 'an object';
  if (typeof v === 'string' && v.length > 48) return `${JSON.stringify(v.slice(0, 48))}...`;
  return JSON.stringify(v);
}

/** The fields of one reply, read as checked: each refusal is TANDEM_EDGE_RESPONSE_INVALID naming the field and its limit. */
export class Fields {
  constructor(readonly where: string) {}

  invalid(field: string, what: string, limit?: number): EdgeError {
    return new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `${field} ${what}`, { field, where: this.where, ...(limit === undefined ? {} : { details: { limit } }) });
  }

  object(v: unknown, field: string): Record<string, unknown> {
    if (!isObject(v)) throw this.invalid(field, `must be an object, got ${shown(v)}`);
    return v;
  }

  array(v: unknown, field: string): unknown[] {
    if (!Array.isArray(v)) throw this.invalid(field, `must be a list, got ${shown(v)}`);
    return v;
  }

  int(v: unknown, field: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) throw this.invalid(field, `must be an integer in [${min}, ${max}], got ${shown(v)}`, max);
    return v;
  }

  /** A finite number of at least `min` (above it when `open`). */
  number(v: unknown, field: string, min = -Infinity, open = false): number {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || (open && v === min)) throw this.invalid(field, `must be a finite number ${open ? 'above' : 'of at least'} ${min}, got ${shown(v)}`);
    return v;
  }

  nullableNumber(v: unknown, field: string, min = -Infinity): number | null {
    return v === null ? null : this.number(v, field, min);
  }

  string(v: unknown, field: string): string {
    if (typeof v !== 'string') throw this.invalid(field, `must be a string, got ${shown(v)}`);
    return v;
  }

  strings(v: unknown, field: string): string[] {
    return this.array(v, field).map((s, i) => this.string(s, `${field}[${i}]`));
  }

  boolean(v: unknown, field: string): boolean {
    if (typeof v !== 'boolean') throw this.invalid(field, `must be true or false, got ${shown(v)}`);
    return v;
  }

  oneOf<T extends string>(v: unknown, field: string, values: readonly T[]): T {
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) throw this.invalid(field, `must be one of ${values.join(', ')}, got ${shown(v)}`);
    return v as T;
  }

  /** A date's text, as milliseconds since the epoch. */
  date(v: unknown, field: string): number {
    const ms = typeof v === 'string' ? Date.parse(v) : NaN;
    if (!Number.isFinite(ms)) throw this.invalid(field, `must be a date, got ${shown(v)}`);
    return ms;
  }
}

/** The global adapter of a round, its structure checked as it arrived; its values are decoded only once it fits the model (checkGlobalFits). */
export interface GlobalAdapter {
  /** adapter_config.json's text, and the object it holds. */
  config: string;
  json: Record<string, unknown>;
  /** By key, sorted: the order an update is flat in. */
  tensors: { key: string; shape: number[]; data: string }[];
  /** Values in all the tensors. */
  values: number;
}

/**
 * A wire adapter's structure: the config's text at most ADAPTER_CONFIG_MAX_BYTES and a JSON
 * object; 1 to MAX_ADAPTER_TENSORS tensors, each a shape of positive integers and exactly the
 * base64 of that many float32 values. Nothing is decoded here.
 */
export function parseWireAdapter(v: unknown, f: Fields, field: string): GlobalAdapter {
  const o = f.object(v, field);
  const config = f.string(o.config, `${field}.config`);
  if (config.length > ADAPTER_CONFIG_MAX_BYTES || Buffer.byteLength(config) > ADAPTER_CONFIG_MAX_BYTES) throw f.invalid(`${field}.config`, `is over the limit of ${ADAPTER_CONFIG_MAX_BYTES} bytes`, ADAPTER_CONFIG_MAX_BYTES);
  let json: unknown;
  try {
    json = JSON.parse(config);
  } catch {
    json = undefined;
  }
  if (!isObject(json)) throw f.invalid(`${field}.config`, 'must be the text of adapter_config.json, a JSON object');
  const wire = f.object(o.tensors, `${field}.tensors`);
  const keys = Object.keys(wire);
  if (keys.length < 1 || keys.length > MAX_ADAPTER_TENSORS) throw f.invalid(`${field}.tensors`, `must hold 1 to ${MAX_ADAPTER_TENSORS} tensors, got ${keys.length}`, MAX_ADAPTER_TENSORS);
  let values = 0;
  const tensors = keys.sort().map((key) => {
    const at = `${field}.tensors.${key}`;
    if (key === '' || key === '__metadata__') throw f.invalid(at, 'is not a tensor name (__metadata__ is safetensors\' own)');
    const t = f.object(wire[key], at);
    const dims = f.array(t.shape, `${at}.shape`);
    if (dims.length < 1) throw f.invalid(`${at}.shape`, 'must list at least one dimension');
    let n = 1;
    const shape = dims.map((d, i) => {
      n *= f.int(d, `${at}.shape[${i}]`, 1);
      if (!Number.isSafeInteger(n)) throw f.invalid(`${at}.shape`, 'has too many values');
      return d as number;
    });
    values += n;
    if (!Number.isSafeInteger(values)) throw f.invalid(`${field}.tensors`, 'have too many values');
    const chars = 4 * Math.ceil((n * 4) / 3);
    if (typeof t.data !== 'string' || t.data.length !== chars) throw f.invalid(`${at}.data`, `must be base64 of ${n} float32 values (${chars} characters), got ${typeof t.data === 'string' ? `${t.data.length} characters` : shown(t.data)}`);
    return { key, shape, data: t.data };
  });
  return { config, json, tensors, values };
}

export function toWire(adapter: GlobalAdapter): WireAdapter {
  return { config: adapter.config, tensors: Object.fromEntries(adapter.tensors.map((t) => [t.key, { shape: t.shape, data: t.data }])) };
}

/**
 * The global adapter against the model this owner trains, before a value is decoded: its config
 * planned as loadAdapter will plan it (every field by its method, sizes against the model, its
 * bytes against the allocation limit), and its tensors exactly the plan's keys and shapes.
 */
export function checkGlobalFits(adapter: GlobalAdapter, model: LlamaModel, where: string): void {
  try {
    const { plan } = planAdapter(model, adapter.json, { metadata: GLOBAL_METADATA, file: `${where} adapter.config` });
    checkAdapterWeights(plan, new Map(adapter.tensors.map((t) => [t.key, t])), `${where} adapter.tensors`);
  } catch (cause) {
    if (!(cause instanceof ModelError)) throw cause;
    const field = cause.tensor === undefined ? `adapter.config${cause.field === undefined ? '' : `.${cause.field}`}` : `adapter.tensors.${cause.tensor}`;
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the global adapter does not fit the model this owner trains: ${cause.message}`, { field, where, cause });
  }
}

export interface DecodedAdapter {
  keys: string[];
  /** By key, each a view of `flat`. */
  tensors: Map<string, { dtype: 'F32'; shape: number[]; data: Float32Array }>;
  flat: Float32Array;
}

/** The global adapter's values: base64 float32, finite, flat in sorted-key order. */
export function decodeGlobal(adapter: GlobalAdapter, where: string): DecodedAdapter {
  const f = new Fields(where);
  const flat = new Float32Array(adapter.values);
  const tensors = new Map<string, { dtype: 'F32'; shape: number[]; data: Float32Array }>();
  let o = 0;
  for (const t of adapter.tensors) {
    const data = decodeFloat32(t.data);
    if (data === null) throw f.invalid(`adapter.tensors.${t.key}.data`, 'is not base64 of float32 values');
    const bad = data.findIndex((x) => !Number.isFinite(x));
    if (bad >= 0) throw f.invalid(`adapter.tensors.${t.key}.data`, `holds ${data[bad]} at index ${bad}; the global adapter's values are finite`);
    flat.set(data, o);
    tensors.set(t.key, { dtype: 'F32', shape: t.shape, data: flat.subarray(o, o + data.length) });
    o += data.length;
  }
  return { keys: adapter.tensors.map((t) => t.key), tensors, flat };
}

/** A round assignment, checked whole as it arrived. */
export interface Round extends Omit<RoundAssignment, 'adapter'> {
  adapter?: GlobalAdapter;
  /** The deadline, and when the assignment arrived, in ms since the epoch. */
  deadlineMs: number;
  receivedMs: number;
}

/** GET .../round: every field the edge reads, refused with TANDEM_EDGE_RESPONSE_INVALID naming it. */
export function parseAssignment(body: unknown, where: string, federation: string): Round {
  const f = new Fields(where);
  const o = f.object(body, 'assignment');
  const a: Round = {
    federation: f.string(o.federation, 'federation'),
    round: f.int(o.round, 'round'),
    attempt: f.int(o.attempt, 'attempt'),
    state: f.oneOf(o.state, 'state', ROUND_STATES),
    sampled: f.boolean(o.sampled, 'sampled'),
    submitted: f.boolean(o.submitted, 'submitted'),
    deadline: f.string(o.deadline, 'deadline'),
    deadlineMs: f.date(o.deadline, 'deadline'),
    receivedMs: Date.now(),
    localSteps: f.int(o.localSteps, 'localSteps', 1, MAX_LOCAL_STEPS),
    mode: f.oneOf(o.mode, 'mode', FEDERATION_MODES),
    aggregation: f.oneOf(o.aggregation, 'aggregation', FEDERATION_AGGREGATIONS),
    model: f.string(o.model, 'model'),
    secureAggregation: f.boolean(o.secureAggregation, 'secureAggregation'),
    owner: f.string(o.owner, 'owner'),
    sampledOwners: f.strings(o.sampledOwners, 'sampledOwners'),
  };
  if (a.sampled && (!a.sampledOwners.includes(a.owner) || new Set(a.sampledOwners).size !== a.sampledOwners.length)) {
    throw f.invalid('sampledOwners', `must name each sampled owner once, this one (${JSON.stringify(a.owner)}) among them`);
  }
  // A round lasts at most a week from when it opened; an hour more for the clocks' skew. A wait ends past the deadline.
  const longest = (MAX_ROUND_DEADLINE_SECONDS + 3600) * 1000;
  if (a.deadlineMs - a.receivedMs > longest) throw f.invalid('deadline', `is ${a.deadline}, more than ${MAX_ROUND_DEADLINE_SECONDS} s (a federation's longest round) and an hour from now`, MAX_ROUND_DEADLINE_SECONDS);
  if (a.federation !== federation) throw f.invalid('federation', `is ${shown(a.federation)}, not the federation asked for (${JSON.stringify(federation)})`);
  if (o.cut !== undefined) {
    const cut = f.object(o.cut, 'cut');
    a.cut = { bottom: f.int(cut.bottom, 'cut.bottom'), top: f.int(cut.top, 'cut.top') };
  }
  if (o.fedproxMu !== undefined) a.fedproxMu = f.number(o.fedproxMu, 'fedproxMu', 0);
  // A cloud before heartbeats sends none: the owner then sends none.
  if (o.ownerTimeoutSeconds !== undefined) a.ownerTimeoutSeconds = f.int(o.ownerTimeoutSeconds, 'ownerTimeoutSeconds', 1, MAX_ROUND_DEADLINE_SECONDS);
  if (o.dp !== undefined) {
    const dp = f.object(o.dp, 'dp');
    a.dp = { clipNorm: f.number(dp.clipNorm, 'dp.clipNorm', 0, true), noiseMultiplier: f.number(dp.noiseMultiplier, 'dp.noiseMultiplier', 0, true) };
  }
  if (o.adapter !== undefined) a.adapter = parseWireAdapter(o.adapter, f, 'adapter');
  return a;
}

/** GET .../secagg (and the views its POSTs answer with). */
export function parseSecAggView(body: unknown, where: string): SecAggView {
  const f = new Fields(where);
  const o = f.object(body, 'secagg');
  const round = f.int(o.round, 'round');
  const attempt = f.int(o.attempt, 'attempt');
  const phase = f.oneOf(o.phase, 'phase', SECAGG_PHASES);
  const sampled = f.strings(o.sampled, 'sampled');
  return {
    round, attempt, phase, sampled,
    threshold: f.int(o.threshold, 'threshold', 1, sampled.length),
    label: f.string(o.label, 'label'),
    advertised: f.array(o.advertised, 'advertised').map((v, i) => {
      const e = f.object(v, `advertised[${i}]`);
      return { owner: f.string(e.owner, `advertised[${i}].owner`), cipherPublic: f.string(e.cipherPublic, `advertised[${i}].cipherPublic`), maskPublic: f.string(e.maskPublic, `advertised[${i}].maskPublic`) };
    }),
    shares: f.array(o.shares, 'shares').map((v, i) => {
      const e = f.object(v, `shares[${i}]`);
      return { from: f.string(e.from, `shares[${i}].from`), to: f.string(e.to, `shares[${i}].to`), box: f.string(e.box, `shares[${i}].box`) };
    }),
    survivors: f.strings(o.survivors, 'survivors'),
  };
}

/** POST .../updates: the acknowledgement of the update sent, for this round and attempt. */
export function parseAck(body: unknown, where: string, sent: Round): RoundUpdateAck {
  const f = new Fields(where);
  const o = f.object(body, 'ack');
  const ack = { federation: f.string(o.federation, 'federation'), round: f.int(o.round, 'round'), attempt: f.int(o.attempt, 'attempt'), received: f.int(o.received, 'received') };
  if (o.accepted !== true) throw f.invalid('accepted', `must be true, got ${shown(o.accepted)}`);
  if (ack.federation !== sent.federation || ack.round !== sent.round || ack.attempt !== sent.attempt) {
    throw f.invalid('round', `acknowledges ${shown(ack.federation)} round ${ack.round}.${ack.attempt}, not the update sent for round ${sent.round}.${sent.attempt}`);
  }
  return { ...ack, accepted: true };
}

function parseRecord(f: Fields, v: unknown, field: string): RoundRecord {
  const o = f.object(v, field);
  const validation = f.object(o.validation, `${field}.validation`);
  const record: RoundRecord = {
    round: f.int(o.round, `${field}.round`),
    attempt: f.int(o.attempt, `${field}.attempt`),
    sampled: f.strings(o.sampled, `${field}.sampled`),
    participants: f.strings(o.participants, `${field}.participants`),
    examples: f.int(o.examples, `${field}.examples`),
    loss: f.nullableNumber(o.loss, `${field}.loss`),
    validation: Object.fromEntries(Object.entries(validation).map(([owner, e]) => {
      const at = `${field}.validation.${owner}`;
      const x = f.object(e, at);
      return [owner, { loss: f.number(x.loss, `${at}.loss`), ...(x.accuracy === undefined ? {} : { accuracy: f.number(x.accuracy, `${at}.accuracy`, 0) }) }];
    })),
    bytesReceived: f.int(o.bytesReceived, `${field}.bytesReceived`),
    bytesSent: f.int(o.bytesSent, `${field}.bytesSent`),
    epsilon: f.nullableNumber(o.epsilon, `${field}.epsilon`, 0),
    completedAt: f.string(o.completedAt, `${field}.completedAt`),
  };
  if (o.lora !== undefined) {
    const lora = f.object(o.lora, `${field}.lora`);
    record.lora = { refactorError: f.number(lora.refactorError, `${field}.lora.refactorError`, 0), naiveError: f.number(lora.naiveError, `${field}.lora.naiveError`, 0) };
  }
  return record;
}

/** GET /v1/federations/:id (and POST /v1/federations). */
export function parseStatus(body: unknown, where: string): FederationStatus {
  const f = new Fields(where);
  const o = f.object(body, 'status');
  const current = f.object(o.current, 'current');
  const rejected = f.object(o.rejected, 'rejected');
  f.date(current.deadline, 'current.deadline');
  return {
    id: f.string(o.id, 'id'),
    model: f.string(o.model, 'model'),
    mode: f.oneOf(o.mode, 'mode', FEDERATION_MODES),
    state: f.oneOf(o.state, 'state', ROUND_STATES),
    round: f.int(o.round, 'round'),
    rounds: f.int(o.rounds, 'rounds'),
    attempt: f.int(o.attempt, 'attempt'),
    owners: f.strings(o.owners, 'owners'),
    aggregation: f.oneOf(o.aggregation, 'aggregation', FEDERATION_AGGREGATIONS),
    secureAggregation: f.boolean(o.secureAggregation, 'secureAggregation'),
    epsilon: f.nullableNumber(o.epsilon, 'epsilon', 0),
    delta: f.nullableNumber(o.delta, 'delta', 0),
    current: { sampled: f.strings(current.sampled, 'current.sampled'), received: f.strings(current.received, 'current.received'), deadline: current.deadline as string },
    history: f.array(o.history, 'history').map((h, i) => parseRecord(f, h, `history[${i}]`)),
    rejected: Object.fromEntries(Object.entries(rejected).map(([code, n]) => [code, f.int(n, `rejected.${code}`)])),
  };
}

