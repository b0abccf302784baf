// The federation coordinator: rounds, sampling, deadlines, minimum owners, aggregation and
// DP accounting, with every federation's state in a federation store (<state>/federations/
// <id>.json, or a cluster's JetStream bucket), written whole before an update is acknowledged,
// so a restarted node resumes the open round with every acknowledged update in it.
import { createHash } from 'node:crypto';
import { FederationError, RdpAccountant, addGaussianNoise, aggregate, clipUpdate, fedAdamStep, layoutOf, flatten, loraAwareDelta, loraPairs, unmaskSum, zeroLoraA } from '../../model/index.ts';
import type { SecAggParams } from '../../model/index.ts';
import type { FedAdamState, TensorSet } from '../../model/index.ts';
import { DEFAULT_OWNER_TIMEOUT_SECONDS, FEDERATION_AGGREGATIONS, FEDERATION_MODES, MAX_LOCAL_STEPS, MAX_ROUND_DEADLINE_SECONDS, decodeFloat32, decodeUint32, encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate, FederationStatus, RoundAlive, RoundAssignment, RoundRecord, RoundUpdate, RoundUpdateAck, SecAggKeys, SecAggPhase, SecAggReveal, SecAggShares, SecAggView, WireAdapter, WireShare } from '../../protocol/index.ts';
import { DirectoryFederationStore } from './directory-federation-store.ts';
import { CoordinatorError } from './errors.ts';
import type { FederationRecord, SecAggRound } from './federation-record.ts';
import type { FederationStore } from './federation-store.ts';
const ID_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const MAX_ADAPTER_VALUES = 16 * 1024 * 1024;
/**
 * exact-product forms every sampled owner's dense B·A per LoRA pair (float64) when a round
 * closes, on the event loop: Σ out·in over the pairs times the sample size is bounded
 * (2^27 multiply-adds, a few hundred ms here) so one federation cannot stall the node.
 */
const MAX_EXACT_PRODUCT_WORK = 2 ** 27;
const MAX_TENSORS = 4096;
/**
 * The largest |loss| an owner may report (a token's cross-entropy is a few tens at most): two
 * owners' ±1e308 made the round's weighted mean NaN, and the operator's view failed to encode.
 */
const MAX_REPORTED_LOSS = 1e6;
const finiteOrNull = (x: number): number | null => (Number.isFinite(x) ? x : null);

/** The bodies an owner sends in a round. */
export type FederationBodyKind = 'update' | 'secagg-keys' | 'secagg-shares' | 'secagg-reveal';

/** The longest SecAgg share box an owner may address to another (characters), and the longest share value (hex digits of a GF(2^521 − 1) element). */
const MAX_SHARE_BOX_CHARS = 8192;
const MAX_SHARE_HEX_DIGITS = 131;
const SHARE_HEX = new RegExp(`^[0-9a-f]{1,${MAX_SHARE_HEX_DIGITS}}$`);

/** Beyond its values or shares, what a round body's other fields and JSON punctuation may take. */
const BODY_FIELDS_BYTES = 64 * 1024;

/** Shamir threshold of a round of n owners: a majority, and never below the minimum owners. */
export function secAggThreshold(n: number, minOwners: number): number {
  return Math.min(n, Math.max(2, minOwners, Math.floor(n / 2) + 1));
}

const B64_32 = /^[A-Za-z0-9+/]{43}=$/;

function invalid(field: string, reason: string): CoordinatorError {
  return new CoordinatorError('TANDEM_FED_CONFIG_INVALID', { field, reason });
}

function intIn(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw invalid(field, `must be an integer in ${min}..${max}, got ${JSON.stringify(v)}`);
  return v;
}

function numIn(v: unknown, field: string, min: number, max: number, open = false): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v > max || (open ? v <= min : v < min)) throw invalid(field, `must be a number in ${open ? '(' : '['}${min}, ${max}], got ${JSON.stringify(v)}`);
  return v;
}

/** The adapter's tensors from the wire, every size checked before decoding. */
export function adapterFromWire(adapter: WireAdapter, field = 'adapter'): TensorSet {
  if (typeof adapter !== 'object' || adapter === null || typeof adapter.config !== 'string' || typeof adapter.tensors !== 'object' || adapter.tensors === null) throw invalid(field, 'must be { config, tensors }');
  try {
    JSON.parse(adapter.config);
  } catch {
    throw invalid(`${field}.config`, 'must be the text of adapter_config.json');
  }
  const keys = Object.keys(adapter.tensors);
  if (keys.length === 0 || keys.length > MAX_TENSORS) throw invalid(`${field}.tensors`, `must hold 1..${MAX_TENSORS} tensors`);
  const set: TensorSet = {};
  let total = 0;
  for (const key of keys) {
    const t = adapter.tensors[key];
    if (typeof t !== 'object' || t === null || !Array.isArray(t.shape) || t.shape.length < 1 || t.shape.length > 4 || t.shape.some((d) => !Number.isInteger(d) || d < 1 || d > MAX_ADAPTER_VALUES)) {
      throw invalid(`${field}.tensors.${key}.shape`, 'must be 1..4 positive integers');
    }
    const n = t.shape.reduce((a, b) => a * b, 1);
    total += n;
    if (total > MAX_ADAPTER_VALUES) throw invalid(`${field}.tensors`, `more than ${MAX_ADAPTER_VALUES} values`);
    const data = typeof t.data === 'string' && t.data.length <= 4 * Math.ceil((n * 4) / 3) ? decodeFloat32(t.data) : null;
    if (data === null || data.length !== n) throw invalid(`${field}.tensors.${key}.data`, `must be base64 of ${n} float32 values`);
    if (data.some((v) => !Number.isFinite(v))) throw invalid(`${field}.tensors.${key}.data`, 'holds NaN or infinity');
    set[key] = { shape: [...t.shape], data };
  }
  return set;
}

export function adapterToWire(config: string, set: TensorSet): WireAdapter {
  const tensors: WireAdapter['tensors'] = {};
  for (const key of Object.keys(set).sort()) tensors[key] = { shape: set[key].shape, data: encodeFloat32(set[key].data) };
  return { config, tensors };
}

function checkCreate(body: FederationCreate): void {
  if (typeof body !== 'object' || body === null) throw invalid('body', 'must be an object');
  if (typeof body.id !== 'string' || !ID_RE.test(body.id)) throw invalid('id', 'must match [a-z0-9][a-z0-9_-]{0,63}');
  if (typeof body.model !== 'string' || body.model.length === 0 || body.model.length > 200) throw invalid('model', 'must be a model id of 1..200 characters');
  if (!FEDERATION_MODES.includes(body.mode)) throw invalid('mode', `must be one of ${FEDERATION_MODES.join(', ')}`);
  intIn(body.rounds, 'rounds', 1, 10_000);
  if (!Array.isArray(body.owners) || body.owners.length < 1 || body.owners.length > 10_000 || body.owners.some((o) => typeof o !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(o))) {
    throw invalid('owners', 'must be 1..10000 tenant names');
  }
  if (new Set(body.owners).size !== body.owners.length) throw invalid('owners', 'holds a tenant twice');
  intIn(body.sampleSize, 'sampleSize', 1, body.owners.length);
  intIn(body.minOwners, 'minOwners', 1, body.sampleSize);
  intIn(body.localSteps, 'localSteps', 1, MAX_LOCAL_STEPS);
  if (body.fedproxMu !== undefined) numIn(body.fedproxMu, 'fedproxMu', 0, 1e4);
  if (body.cut !== undefined) {
    if (body.mode !== 'split') throw invalid('cut', 'only split mode has a cut');
    if (typeof body.cut !== 'object' || body.cut === null) throw invalid('cut', 'must be { bottom, top }');
    intIn(body.cut.bottom, 'cut.bottom', 0, 1000);
    intIn(body.cut.top, 'cut.top', 0, 1000);
  }
  intIn(body.roundDeadlineSeconds, 'roundDeadlineSeconds', 1, MAX_ROUND_DEADLINE_SECONDS);
  if (body.ownerTimeoutSeconds !== undefined) intIn(body.ownerTimeoutSeconds, 'ownerTimeoutSeconds', 1, body.roundDeadlineSeconds);
  if (!FEDERATION_AGGREGATIONS.includes(body.aggregation)) throw invalid('aggregation', `must be one of ${FEDERATION_AGGREGATIONS.join(', ')}`);
  if (body.trimFraction !== undefined) numIn(body.trimFraction, 'trimFraction', 0, 0.49);
  if (body.serverLearningRate !== undefined) numIn(body.serverLearningRate, 'serverLearningRate', 0, 100, true);
  if (typeof body.secureAggregation !== 'boolean') throw invalid('secureAggregation', 'must be a boolean');
  if (body.secureAggregation && body.sampleSize < 2) throw invalid('sampleSize', 'secure aggregation needs at least 2 owners per round');
  if (body.dp !== undefined && body.aggregation === 'exact-product') throw invalid('aggregation', 'DP noises the sum of flat deltas: exact-product needs each owner\'s adapter');
  if (body.secureAggregation && !['fedavg', 'fedadam', 'ffa-lora'].includes(body.aggregation)) throw invalid('aggregation', 'under secure aggregation the cloud sees only the sum: fedavg, fedadam or ffa-lora');
  if (body.dp !== undefined) {
    if (typeof body.dp !== 'object' || body.dp === null) throw invalid('dp', 'must be an object');
    numIn(body.dp.clipNorm, 'dp.clipNorm', 0, 1e6, true);
    numIn(body.dp.noiseMultiplier, 'dp.noiseMultiplier', 0, 1000, true);
    numIn(body.dp.delta, 'dp.delta', 0, 0.5, true);
    numIn(body.dp.epsilonBudget, 'dp.epsilonBudget', 0, 1e6, true);
  }
}

/** How long an owner the round waits on may stay silent before it is taken as gone (FederationCreate.ownerTimeoutSeconds). */
export function ownerTimeoutSeconds(config: Pick<FederationCreate, 'ownerTimeoutSeconds' | 'roundDeadlineSeconds'>): number {
  return config.ownerTimeoutSeconds ?? Math.min(DEFAULT_OWNER_TIMEOUT_SECONDS, config.roundDeadlineSeconds);
}

/** Owners of a round attempt: the invited sorted by SHA-256 of (federation, round, attempt, owner). */
export function sampleOwners(id: string, owners: readonly string[], round: number, attempt: number, size: number): string[] {
  const rank = (o: string): string => createHash('sha256').update(`${id}|${round}|${attempt}|${o}`).digest('hex');
  return [...owners].sort((a, b) => (rank(a) < rank(b) ? -1 : 1)).slice(0, size).sort();
}

export interface CoordinatorOptions {
  /** The embedded store's state directory, when no `store` is given. */
  stateDir?: string;
  /** Where the federations are kept (a cluster's JetStream bucket); the state directory's folder by default. */
  store?: FederationStore;
  /** Clock, for tests of deadlines; Date.now by default. */
  now?: () => number;
  /** How often deadlines are checked. */
  tickMs?: number;
  onRound?: (federation: string, record: RoundRecord) => void;
}

export class Coordinator {
  readonly #store: FederationStore;
  readonly #now: () => number;
  readonly #federations = new Map<string, FederationRecord>();
  readonly #timer: NodeJS.Timeout;
  readonly #onRound?: CoordinatorOptions['onRound'];
  /**
   * When each owner of each federation last called (in memory: after a restart every owner's
   * silence counts from the start). Only a store with one writer sees every call.
   */
  readonly #seen = new Map<string, Map<string, number>>();
  readonly #startedAt: number;

  private constructor(options: CoordinatorOptions, store: FederationStore) {
    this.#store = store;
    this.#now = options.now ?? Date.now;
    this.#startedAt = this.#now();
    this.#onRound = options.onRound;
    this.#timer = setInterval(() => void this.tick().catch(() => undefined), options.tickMs ?? 250);
    this.#timer.unref();
  }

  static async open(options: CoordinatorOptions): Promise<Coordinator> {
    if (options.store === undefined && options.stateDir === undefined) throw new CoordinatorError('TANDEM_FED_CONFIG_INVALID', { field: 'stateDir', reason: 'a coordinator needs a state directory or a store' });
    const store: FederationStore = options.store ?? new DirectoryFederationStore(options.stateDir as string);
    const c = new Coordinator(options, store);
    // Another gateway's save replaces the record here (a store with one writer never calls this).
    store.onRemoteChange = (record) => c.#federations.set(record.config.id, record);
    for (const record of await store.load()) c.#federations.set(record.config.id, record);
    return c;
  }

  close(): void {
    clearInterval(this.#timer);
    this.#store.close();
  }

  async create(body: FederationCreate): Promise<FederationStatus> {
    checkCreate(body);
    if (this.#federations.has(body.id)) throw new CoordinatorError('TANDEM_FED_EXISTS', { federation: body.id });
    const tensors = adapterFromWire(body.adapter);
    const layout = layoutOf(tensors);
    if (body.aggregation === 'exact-product') {
      const perOwner = loraPairs(Object.keys(tensors)).reduce((sum, p) => sum + tensors[p.b].shape[0] * tensors[p.a].shape[1], 0);
      if (perOwner * body.sampleSize > MAX_EXACT_PRODUCT_WORK) {
        throw invalid('aggregation', `exact-product would form ${perOwner} product values per owner for ${body.sampleSize} owners a round, over the limit of ${MAX_EXACT_PRODUCT_WORK}: use fedavg or ffa-lora, or fewer owners a round`);
      }
    }
    const { adapter, ...config } = body;
    const record: FederationRecord = {
      config, adapterConfig: adapter.config, layout, global: encodeFloat32(flatten(tensors, layout)),
      state: 'open', round: 0, attempt: 0, sampled: [], deadline: 0, received: {}, bytesSent: 0, history: [], accountant: { steps: [] }, rejected: {},
    };
    this.#federations.set(body.id, record);
    this.#openRound(record, 1, 0);
    await this.#save(record);
    return this.status(body.id);
  }

  #get(id: string): FederationRecord {
    const r = this.#federations.get(id);
    if (!r) throw new CoordinatorError('TANDEM_FED_UNKNOWN', { federation: id });
    return r;
  }

  #openRound(r: FederationRecord, round: number, attempt: number): void {
    r.round = round;
    r.attempt = attempt;
    r.received = {};
    r.bytesSent = 0;
    const { dp, owners, sampleSize } = r.config;
    if (round > r.config.rounds) {
      r.state = 'done';
      r.sampled = [];
      return;
    }
    if (dp) {
      const preview = new RdpAccountant(r.accountant).preview(dp.noiseMultiplier, sampleSize / owners.length, dp.delta);
      if (preview.epsilon > dp.epsilonBudget) {
        r.state = 'stopped';
        r.stopReason = `round ${round} would bring ε to ${preview.epsilon.toFixed(3)}, over the budget ${dp.epsilonBudget}`;
        r.sampled = [];
        return;
      }
    }
    r.sampled = sampleOwners(r.config.id, owners, round, attempt, sampleSize);
    r.secagg = r.config.secureAggregation
      ? { phase: 'keys', threshold: secAggThreshold(r.sampled.length, r.config.minOwners), advertised: {}, shares: {}, masked: {}, survivors: [], reveals: {} }
      : undefined;
    r.deadline = this.#now() + r.config.roundDeadlineSeconds * 1000;
  }

  #save(r: FederationRecord): Promise<void> {
    return this.#store.save(JSON.parse(JSON.stringify(r)) as FederationRecord);
  }

  /** Federation `id`, when `tenant` is one of its owners (TANDEM_FED_UNKNOWN, TANDEM_FED_NOT_INVITED). */
  #owned(id: string, tenant: string): FederationRecord {
    const r = this.#get(id);
    if (!r.config.owners.includes(tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_NOT_INVITED', { tenant, federation: id }));
    let seen = this.#seen.get(id);
    if (!seen) this.#seen.set(id, (seen = new Map()));
    seen.set(tenant, this.#now());
    return r;
  }

  /** The owners the open attempt waits on in its phase: those sampled that have not sent what the phase asks for. */
  #waitingOn(r: FederationRecord): string[] {
    const missing = (owners: readonly string[], done: object): string[] => owners.filter((o) => !Object.hasOwn(done, o));
    const sa = r.secagg;
    if (!sa) return missing(r.sampled, r.received);
    switch (sa.phase) {
      case 'keys': return missing(r.sampled, sa.advertised);
      case 'shares': return missing(Object.keys(sa.advertised), sa.shares);
      case 'masked': return missing(Object.keys(sa.shares), sa.masked);
      case 'reveal': return missing(sa.survivors, sa.reveals);
    }
  }

  /**
   * Whether every owner the open attempt waits on took it up (called since its deadline began,
   * and since this coordinator started) and has been silent since for the owner timeout: then
   * the round need not wait for its deadline. An owner that has not called yet may still be
   * starting, or rejoining after a crash: it is waited for until the deadline.
   */
  #ownersGone(r: FederationRecord): boolean {
    if (this.#store.shared) return false;
    const timeout = ownerTimeoutSeconds(r.config) * 1000;
    const since = Math.max(this.#startedAt, r.deadline - r.config.roundDeadlineSeconds * 1000);
    const seen = this.#seen.get(r.config.id);
    const waiting = this.#waitingOn(r);
    const now = this.#now();
    return waiting.length > 0 && waiting.every((o) => {
      const last = seen?.get(o);
      return last !== undefined && last >= since && now - last > timeout;
    });
  }

  /** An owner's heartbeat while it trains its part of `round` (calling for anything else in the federation counts too). */
  alive(id: string, tenant: string, round: number, attempt: unknown): RoundAlive {
    const r = this.#owned(id, tenant);
    const current = r.state === 'open' && round === r.round && attempt === r.attempt && r.sampled.includes(tenant);
    return { federation: id, round: r.round, attempt: r.attempt, state: r.state, current };
  }

  /**
   * Whether `tenant` may send a `kind` body for `round` of federation `id` now: an owner, the
   * round open and current, the tenant sampled in it. Checked before a body is read; the handler
   * checks the rest (attempt, replay, deadline). Returns the most bytes such a body can hold: an
   * update is its adapter's values in base64 and a few fields, SecAgg messages a share per
   * sampled owner, so a body is parsed only at the size the federation's own adapter sets.
   */
  admitsBody(id: string, tenant: string, round: number, kind: FederationBodyKind): number {
    const r = this.#owned(id, tenant);
    if (r.state !== 'open' || round !== r.round) {
      throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round, attempt: 'any', current: r.round, currentAttempt: r.attempt, state: r.state }));
    }
    if (!r.sampled.includes(tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_NOT_SAMPLED', { tenant, round, attempt: r.attempt }));
    const owners = r.sampled.length;
    switch (kind) {
      case 'update': return 4 * Math.ceil((r.layout.size * 4) / 3) + BODY_FIELDS_BYTES;
      case 'secagg-keys': return BODY_FIELDS_BYTES;
      // One box and two tenant names (≤ 64 characters) an owner.
      case 'secagg-shares': return owners * (MAX_SHARE_BOX_CHARS + 2 * 64 + 64) + BODY_FIELDS_BYTES;
      // Two maps of owner → { x, y }.
      case 'secagg-reveal': return 2 * owners * (64 + MAX_SHARE_HEX_DIGITS + 64) + BODY_FIELDS_BYTES;
    }
  }

  #reject(r: FederationRecord, error: CoordinatorError): CoordinatorError {
    r.rejected[error.code] = (r.rejected[error.code] ?? 0) + 1;
    return error;
  }

  /** What `tenant` does next in federation `id`. */
  assignment(id: string, tenant: string): RoundAssignment {
    const r = this.#owned(id, tenant);
    const sampled = r.state === 'open' && r.sampled.includes(tenant);
    const submitted = Object.hasOwn(r.received, tenant);
    const out: RoundAssignment = {
      federation: id, round: r.round, attempt: r.attempt, state: r.state, sampled, submitted, deadline: new Date(r.deadline).toISOString(),
      localSteps: r.config.localSteps, mode: r.config.mode, model: r.config.model, aggregation: r.config.aggregation,
      ...(r.config.cut ? { cut: { ...r.config.cut } } : {}), ...(r.config.fedproxMu ? { fedproxMu: r.config.fedproxMu } : {}),
      secureAggregation: r.config.secureAggregation, owner: tenant, sampledOwners: sampled ? [...r.sampled] : [], ownerTimeoutSeconds: ownerTimeoutSeconds(r.config),
    };
    if (r.config.dp) out.dp = { clipNorm: r.config.dp.clipNorm, noiseMultiplier: r.config.dp.noiseMultiplier };
    if (sampled && !submitted) {
      out.adapter = this.globalAdapter(id);
      r.bytesSent += r.layout.size * 4;
    }
    return out;
  }

  globalAdapter(id: string): WireAdapter {
    const r = this.#get(id);
    const values = decodeFloat32(r.global)!;
    const tensors: WireAdapter['tensors'] = {};
    let o = 0;
    r.layout.keys.forEach((key, i) => {
      const n = r.layout.shapes[i].reduce((a, b) => a * b, 1);
      tensors[key] = { shape: r.layout.shapes[i], data: encodeFloat32(values.subarray(o, o + n)) };
      o += n;
    });
    return { config: r.adapterConfig, tensors };
  }

  /** Takes one owner's update; every check comes before it is stored, and it is stored before the ack. */
  async submit(id: string, tenant: string, round: number, body: RoundUpdate): Promise<RoundUpdateAck> {
    const r = this.#owned(id, tenant);
    const attempt = body?.attempt;
    if (r.state !== 'open' || round !== r.round || attempt !== r.attempt) {
      throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round, attempt: String(attempt), current: r.round, currentAttempt: r.attempt, state: r.state }));
    }
    if (!r.sampled.includes(tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_NOT_SAMPLED', { tenant, round, attempt }));
    if (Object.hasOwn(r.received, tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_REPLAY', { tenant, round, attempt }));
    if (this.#now() > r.deadline) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round, attempt, current: r.round, currentAttempt: r.attempt, state: 'past its deadline' }));
    const shape = (field: string, reason: string): CoordinatorError => this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_SHAPE', { field, reason }));
    if (typeof body.examples !== 'number' || !Number.isInteger(body.examples) || body.examples < 1 || body.examples > 1e9) throw shape('examples', 'must be an integer in 1..1e9');
    if (typeof body.loss !== 'number' || !(Math.abs(body.loss) <= MAX_REPORTED_LOSS)) throw shape('loss', `must be a number in [-${MAX_REPORTED_LOSS}, ${MAX_REPORTED_LOSS}]`);
    if (body.validation !== undefined && (typeof body.validation !== 'object' || body.validation === null || !(Math.abs(body.validation.loss) <= MAX_REPORTED_LOSS) || (body.validation.accuracy !== undefined && !(body.validation.accuracy >= 0 && body.validation.accuracy <= 1)))) {
      throw shape('validation', `must be { loss in [-${MAX_REPORTED_LOSS}, ${MAX_REPORTED_LOSS}], accuracy? in [0, 1] }`);
    }
    const expectedChars = 4 * Math.ceil((r.layout.size * 4) / 3);
    const field = r.secagg ? 'masked' : 'values';
    const text = r.secagg ? body.masked : body.values;
    if (typeof text !== 'string' || text.length !== expectedChars) throw shape(field, `must be base64 of ${r.layout.size} 4-byte values (${expectedChars} characters), got ${typeof text === 'string' ? text.length : typeof text}`);
    const values = decodeFloat32(text);
    if (values === null || values.length !== r.layout.size) throw shape(field, `must be base64 of ${r.layout.size} 4-byte values`);
    if (r.secagg) {
      if (r.secagg.phase !== 'masked' || !Object.hasOwn(r.secagg.shares, tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round, attempt, current: r.round, currentAttempt: r.attempt, state: `secure aggregation phase ${r.secagg.phase}${Object.hasOwn(r.secagg.shares, tenant) ? '' : ', and this owner shared no keys'}` }));
      r.secagg.masked[tenant] = text;
    } else {
      const bad = values.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_NON_FINITE', { index: bad, value: String(values[bad]) }));
    }
    r.received[tenant] = { examples: body.examples, values: r.secagg ? '' : text, loss: body.loss, validation: body.validation, bytes: values.length * 4 };
    const received = Object.keys(r.received).length;
    if (r.secagg) {
      if (received === Object.keys(r.secagg.shares).length) this.#toReveal(r);
    } else if (received === r.sampled.length) this.#closeRound(r);
    await this.#save(r);
    return { federation: id, round, attempt, accepted: true, received };
  }

  /**
   * Closes an expired round with the updates in, or retries it with a new sample. A round whose
   * every owner it waits on is gone (#ownersGone) expires then.
   */
  async tick(): Promise<void> {
    for (const r of this.#federations.values()) {
      if (r.state !== 'open' || (this.#now() <= r.deadline && !this.#ownersGone(r))) continue;
      const enough = Object.keys(r.received).length >= Math.max(r.config.minOwners, r.secagg?.threshold ?? 0);
      if (r.secagg?.phase === 'masked' && enough) this.#toReveal(r);
      else if (r.secagg?.phase === 'reveal' && Object.keys(r.secagg.reveals).length >= r.secagg.threshold) {
        try {
          this.#closeRound(r);
        } catch (error) {
          if (!(error instanceof FederationError)) throw error;
          this.#openRound(r, r.round, r.attempt + 1); // the reveals do not unmask: retry the round
        }
      }
      else if (!r.secagg && enough) this.#closeRound(r);
      else this.#openRound(r, r.round, r.attempt + 1);
      try {
        await this.#save(r);
      } catch (error) {
        // Another gateway of the cluster moved the round first: its record arrives by the watch.
        if (!(error instanceof CoordinatorError && error.code === 'TANDEM_FED_STATE_CONFLICT')) throw error;
      }
    }
  }

  #closeRound(r: FederationRecord): void {
    const owners = Object.keys(r.received).sort();
    const { dp, aggregation } = r.config;
    let delta: Float32Array;
    let lora: RoundRecord['lora'];
    let epsilon: number | null = null;
    if (r.secagg) {
      // Owners sent examples·delta (1·delta under DP, noise split across them); the cloud sees only the sum.
      const sum = this.#unmask(r);
      const weight = dp ? owners.length : owners.reduce((s, o) => s + r.received[o].examples, 0);
      delta = sum.map((v) => v / weight);
      if (dp) {
        const accountant = new RdpAccountant(r.accountant);
        epsilon = accountant.spendRound(dp.noiseMultiplier, r.config.sampleSize / r.config.owners.length, dp.delta, Infinity).epsilon;
        r.accountant = accountant.state();
      }
    } else if (dp) {
      // DP-FedAvg: clip again here (an owner may not have), noise N(0, (σC)²) on the sum, uniform mean.
      const updates = owners.map((o) => ({ values: decodeFloat32(r.received[o].values)! }));
      const sum = new Float32Array(r.layout.size);
      for (const u of updates) {
        clipUpdate(u.values, dp.clipNorm);
        for (let i = 0; i < sum.length; i++) sum[i] += u.values[i];
      }
      addGaussianNoise(sum, dp.noiseMultiplier * dp.clipNorm);
      delta = sum.map((v) => v / updates.length);
      const accountant = new RdpAccountant(r.accountant);
      epsilon = accountant.spendRound(dp.noiseMultiplier, r.config.sampleSize / r.config.owners.length, dp.delta, Infinity).epsilon;
      r.accountant = accountant.state();
    } else if (aggregation === 'ffa-lora' || aggregation === 'exact-product') {
      const updates = owners.map((o) => ({ values: decodeFloat32(r.received[o].values)!, weight: r.received[o].examples }));
      ({ delta, lora } = loraAwareDelta(aggregation, decodeFloat32(r.global)!, updates, r.layout));
    } else {
      const updates = owners.map((o) => ({ values: decodeFloat32(r.received[o].values)!, weight: r.received[o].examples }));
      delta = aggregate(aggregation === 'fedadam' ? 'fedavg' : aggregation, updates, r.config.trimFraction ?? 0.2);
    }
    // FFA-LoRA: A stays at its shared initialisation whatever an owner sent (under SecAgg or DP too).
    if (aggregation === 'ffa-lora') zeroLoraA(delta, r.layout);
    const global = decodeFloat32(r.global)!;
    if (aggregation === 'fedadam') {
      const state: FedAdamState | undefined = r.fedAdam ? { m: decodeFloat32(r.fedAdam.m)!, v: decodeFloat32(r.fedAdam.v)!, round: r.fedAdam.round } : undefined;
      const { step, state: next } = fedAdamStep(delta, state, { learningRate: r.config.serverLearningRate ?? 0.01 });
      r.fedAdam = { m: encodeFloat32(next.m), v: encodeFloat32(next.v), round: next.round };
      for (let i = 0; i < global.length; i++) global[i] += step[i];
    } else {
      const lr = r.config.serverLearningRate ?? 1;
      for (let i = 0; i < global.length; i++) global[i] += lr * delta[i];
    }
    r.global = encodeFloat32(global);
    const examples = owners.reduce((s, o) => s + r.received[o].examples, 0);
    const validation: RoundRecord['validation'] = {};
    for (const o of owners) if (r.received[o].validation) validation[o] = r.received[o].validation!;
    const record: RoundRecord = {
      round: r.round, attempt: r.attempt, sampled: [...r.sampled], participants: owners, examples,
      loss: finiteOrNull(owners.reduce((s, o) => s + r.received[o].loss * r.received[o].examples, 0) / examples),
      validation, bytesReceived: owners.reduce((s, o) => s + r.received[o].bytes, 0), bytesSent: r.bytesSent, epsilon, ...(lora ? { lora } : {}), completedAt: new Date(this.#now()).toISOString(),
    };
    r.history.push(record);
    this.#onRound?.(r.config.id, record);
    this.#openRound(r, r.round + 1, 0);
  }

  #params(r: FederationRecord): SecAggParams {
    return { round: `${r.config.id}|${r.round}|${r.attempt}`, length: r.layout.size, threshold: r.secagg!.threshold, owners: r.sampled.length };
  }

  #toReveal(r: FederationRecord): void {
    const sa = r.secagg!;
    sa.phase = 'reveal';
    sa.survivors = Object.keys(sa.masked).sort();
    r.deadline = this.#now() + r.config.roundDeadlineSeconds * 1000;
  }

  #unmask(r: FederationRecord): Float32Array {
    const sa = r.secagg!;
    const shared = Object.keys(sa.shares).map((o) => sa.advertised[o]);
    const masked = new Map(sa.survivors.map((o) => [o, decodeUint32(sa.masked[o])!] as const));
    return unmaskSum(this.#params(r), shared, masked, Object.values(sa.reveals));
  }

  #secaggRound(id: string, tenant: string, round: number, attempt: unknown): { r: FederationRecord; sa: SecAggRound } {
    const r = this.#owned(id, tenant);
    if (r.state !== 'open' || round !== r.round || attempt !== r.attempt || !r.secagg) {
      throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round, attempt: String(attempt), current: r.round, currentAttempt: r.attempt, state: r.secagg ? r.state : 'no secure aggregation' }));
    }
    if (!r.sampled.includes(tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_NOT_SAMPLED', { tenant, round, attempt: r.attempt }));
    return { r, sa: r.secagg };
  }

  #phaseError(r: FederationRecord, sa: SecAggRound, want: SecAggPhase): CoordinatorError {
    return this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_LATE', { round: r.round, attempt: r.attempt, current: r.round, currentAttempt: r.attempt, state: `secure aggregation is in phase ${sa.phase}, not ${want}` }));
  }

  secAggView(id: string, tenant: string, round: number): SecAggView {
    const r = this.#get(id);
    const { sa } = this.#secaggRound(id, tenant, round, r.attempt);
    const after = (p: SecAggPhase): boolean => ['keys', 'shares', 'masked', 'reveal'].indexOf(sa.phase) >= ['keys', 'shares', 'masked', 'reveal'].indexOf(p);
    return {
      round: r.round, attempt: r.attempt, phase: sa.phase, threshold: sa.threshold, label: this.#params(r).round, sampled: [...r.sampled],
      advertised: after('shares') ? Object.values(sa.advertised) : [],
      shares: after('masked') ? Object.values(sa.shares).flat().filter((s) => s.to === tenant) : [],
      survivors: sa.phase === 'reveal' ? [...sa.survivors] : [],
    };
  }

  async advertise(id: string, tenant: string, round: number, body: SecAggKeys): Promise<SecAggView> {
    const { r, sa } = this.#secaggRound(id, tenant, round, body?.attempt);
    if (sa.phase !== 'keys') throw this.#phaseError(r, sa, 'keys');
    if (Object.hasOwn(sa.advertised, tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_REPLAY', { tenant, round, attempt: r.attempt }));
    for (const f of ['cipherPublic', 'maskPublic'] as const) {
      if (typeof body[f] !== 'string' || !B64_32.test(body[f])) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_SHAPE', { field: f, reason: 'must be base64 of a 32-byte X25519 public key' }));
    }
    if (body.cipherPublic === body.maskPublic || Object.values(sa.advertised).some((a) => a.maskPublic === body.maskPublic || a.cipherPublic === body.cipherPublic)) {
      throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_REPLAY', { tenant, round, attempt: r.attempt }));
    }
    sa.advertised[tenant] = { owner: tenant, cipherPublic: body.cipherPublic, maskPublic: body.maskPublic };
    if (Object.keys(sa.advertised).length === r.sampled.length) sa.phase = 'shares';
    await this.#save(r);
    return this.secAggView(id, tenant, round);
  }

  async share(id: string, tenant: string, round: number, body: SecAggShares): Promise<SecAggView> {
    const { r, sa } = this.#secaggRound(id, tenant, round, body?.attempt);
    if (sa.phase !== 'shares') throw this.#phaseError(r, sa, 'shares');
    if (Object.hasOwn(sa.shares, tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_REPLAY', { tenant, round, attempt: r.attempt }));
    const owners = Object.keys(sa.advertised).sort();
    const list = Array.isArray(body.shares) ? body.shares : [];
    const to = list.map((s) => s?.to).sort();
    if (list.length !== owners.length || to.some((t, i) => t !== owners[i]) || list.some((s) => s.from !== tenant || typeof s.box !== 'string' || s.box.length > MAX_SHARE_BOX_CHARS)) {
      throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_SHAPE', { field: 'shares', reason: `must be one box (≤ ${MAX_SHARE_BOX_CHARS} characters) from ${tenant} to each of ${owners.join(', ')}` }));
    }
    sa.shares[tenant] = list.map((s) => ({ from: s.from, to: s.to, box: s.box }));
    if (Object.keys(sa.shares).length === owners.length) sa.phase = 'masked';
    await this.#save(r);
    return this.secAggView(id, tenant, round);
  }

  async reveal(id: string, tenant: string, round: number, body: SecAggReveal): Promise<SecAggView> {
    const { r, sa } = this.#secaggRound(id, tenant, round, body?.attempt);
    if (sa.phase !== 'reveal') throw this.#phaseError(r, sa, 'reveal');
    if (!sa.survivors.includes(tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_NOT_SAMPLED', { tenant, round, attempt: r.attempt }));
    if (Object.hasOwn(sa.reveals, tenant)) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_REPLAY', { tenant, round, attempt: r.attempt }));
    const dropped = Object.keys(sa.shares).filter((o) => !sa.survivors.includes(o));
    const check = (m: unknown, allowed: string[], field: string): Record<string, WireShare> => {
      const ok = typeof m === 'object' && m !== null && Object.entries(m).every(([o, s]) => allowed.includes(o) && Number.isInteger((s as WireShare)?.x) && typeof (s as WireShare)?.y === 'string' && SHARE_HEX.test((s as WireShare).y));
      if (!ok) throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_SHAPE', { field, reason: `must map owners among ${allowed.join(', ') || '(none)'} to shares { x, y (hex) }` }));
      return m as Record<string, WireShare>;
    };
    // A survivor reveals self-mask shares of survivors only, and key shares of dropped owners only: never both for one owner.
    const selfMask = check(body.selfMask, sa.survivors, 'selfMask');
    const maskKey = check(body.maskKey, dropped, 'maskKey');
    sa.reveals[tenant] = { owner: tenant, selfMask, maskKey };
    if (Object.keys(sa.reveals).length === sa.survivors.length) {
      try {
        this.#closeRound(r);
      } catch (error) {
        if (!(error instanceof FederationError)) throw error;
        delete sa.reveals[tenant];
        throw this.#reject(r, new CoordinatorError('TANDEM_FED_UPDATE_SHAPE', { field: 'reveal', reason: error.message }));
      }
    }
    await this.#save(r);
    return r.round === round && r.secagg === sa ? this.secAggView(id, tenant, round) : { ...this.secAggViewClosed(round, sa) };
  }

  private secAggViewClosed(round: number, sa: SecAggRound): SecAggView {
    return { round, attempt: -1, phase: 'reveal', threshold: sa.threshold, label: '', sampled: [], advertised: [], shares: [], survivors: [...sa.survivors] };
  }

  /** The federations' ids, sorted. */
  ids(): string[] {
    return [...this.#federations.keys()].sort();
  }

  status(id: string): FederationStatus {
    const r = this.#get(id);
    const dp = r.config.dp;
    return {
      id, model: r.config.model, mode: r.config.mode, state: r.state, round: r.round, rounds: r.config.rounds, attempt: r.attempt,
      owners: [...r.config.owners], aggregation: r.config.aggregation, secureAggregation: r.config.secureAggregation,
      epsilon: dp ? new RdpAccountant(r.accountant).spent(dp.delta).epsilon : null, delta: dp ? dp.delta : null,
      current: { sampled: [...r.sampled], received: Object.keys(r.received).sort(), deadline: new Date(r.deadline).toISOString() },
      history: r.history.map((h) => ({ ...h })), rejected: { ...r.rejected },
    };
  }
}
