// The data plane's logic, transport aside: one envelope in, one encoded reply envelope out.
// Hello and SessionOpen welcome a session; Forward and Backward run the middle; replies
// are kept per (session, step, microbatch, kind) so a retry gets the same bytes and is
// computed once. What a request may cost is checked before any work: the limits a Hello
// states against their floors, the codecs' parameters by a trial encode, and each frame's
// DECLARED shape against the session's shape limits before it is validated or decoded.
import { randomUUID } from 'node:crypto';
import {
  CODEC_NAMES, ErrorFeedback, FeedbackLedger, checkLimitFloors, decodeEnvelope, decodeTensor, encodeEnvelope, encodeTensor, envelope, frameBytes,
  intersectLimits, negotiateCodecs, negotiateVersion, validateFrame,
} from '../protocol/index.ts';
import type {
  Backward, Body, CloseReason, CodecChoice, CodecName, CodecOffer, CodecPreferences, CodecSpec, Envelope, Forward, Heartbeat, Hello, InferStep, Limits,
  SessionClose, SessionOpen, StepCommit, TensorFrame, Welcome,
} from '../protocol/index.ts';
import type { ActivationCache } from './activation-cache.ts';
import { HeldAdapter } from './held-adapters.ts';
import type { HeldAdapters } from './held-adapters.ts';
import { CloudError } from './errors.ts';
import type { CloudMetrics, StepKind } from './metrics.ts';
import { TapeLost } from './middle-executor.ts';
import { quotaExceeded } from './quotas.ts';
import type { Shape3 } from './middle-executor.ts';
import type { MiddleRunner } from './middle-runner.ts';
import type { QuotaLedger } from './quotas.ts';
import type { ServedModel } from './served-model.ts';
import type { Caller } from './state/key-store.ts';
import { OpenSessionCounts } from './state/session-access.ts';
import type { SessionRecords } from './state/session-records.ts';
import type { SessionRecord } from './state/session-store.ts';
import type { SplitInference } from './serving/split-inference.ts';

export const SERVER_BUILD = 'tandem-cloud/0.1.0';

/** Bounds of the Hello's strings that a session record keeps. */
export const HELLO_STRING_LIMITS = { clientBuild: 128, methods: 32, method: 64 } as const;
export const DEFAULT_SESSION_IDLE_MS = 60 * 60 * 1000;
export const DEFAULT_CLOSED_RETENTION_MS = 24 * 60 * 60 * 1000;
export const DEFAULT_CLOSED_SESSIONS_PER_TENANT = 100;

/** Session lifetimes: idle expiry and the pruning of closed sessions. */
export interface SessionLifetimes {
  /** An open session with no request for this long is closed with reason `expired`. */
  idleMs: number;
  /** A closed session is forgotten (its record removed) this long after it closed. */
  closedRetentionMs: number;
  /** At most this many closed sessions are kept per tenant; the oldest are forgotten first. */
  closedPerTenant: number;
}

/** An encoded reply and the largest message the transport may send to this peer in one piece. */
export interface Reply {
  bytes: Uint8Array;
  maxMessageBytes: number;
}

interface ComputedReply {
  requestId: string;
  bytes: Uint8Array;
}

/** What a session holds in memory only: requests being computed, and the gradient codec's error feedback (kept replies live in the cache). */
interface SessionRuntime {
  inFlight: Map<string, Promise<ComputedReply>>;
  /** StepCommits of the session, one after another. */
  commits?: Promise<unknown>;
  feedback?: ErrorFeedback;
}

/** Shape limits every session of the node gets, checked against a frame's declared shape. */
export interface ShapeLimits {
  /** batch x sequence of one micro-batch. */
  maxMicrobatchTokens: number;
  /** Longest sequence; never more than the model's context (max_position_embeddings). */
  maxSequenceLength?: number;
}

export const DEFAULT_MAX_MICROBATCH_TOKENS = 16 * 1024;

export interface SessionServiceOptions {
  store: SessionRecords;
  metrics: CloudMetrics;
  cache: ActivationCache;
  /** The served model and its executor; undefined until loaded. */
  model: () => { served: ServedModel; executor: MiddleRunner };
  limits: Limits;
  /** Codecs the node accepts per direction; the edge's order of preference decides among them. */
  codecs?: CodecPreferences;
  quotas: QuotaLedger;
  lifetimes?: Partial<SessionLifetimes>;
  shapeLimits?: Partial<ShapeLimits>;
  /** Middle adapters the node holds for sessions (protocol 1.3); a Hello asking for one is refused without. */
  held?: HeldAdapters;
  /** The middle's KV caches of split inference (InferStep, InferEnd); refused without. */
  inference?: SplitInference;
  /** Told of every Forward and Backward the middle computed (not of retries answered from kept replies): the operator's view. */
  onComputed?: (computed: ComputedStep) => void;
}

/** A Forward or Backward the middle computed, with the tokens (batch x sequence) its first frame declares. */
export interface ComputedStep {
  session: SessionRecord;
  kind: StepKind;
  message: Forward | Backward;
  tokens: number;
}

const ALL_CODECS: CodecPreferences = { forward: CODEC_NAMES, backward: CODEC_NAMES };

function replyKey(kind: StepKind, step: number, microbatch: number): string {
  return `${kind}:${step}:${microbatch}`;
}

/** Tokens (batch x sequence) a hidden-state frame declares; 0 for a shape the frame checks will refuse. */
function tokensOf(frame: TensorFrame | undefined): number {
  const s = frame?.shape;
  return s !== undefined && s.length === 3 ? s[0] * s[1] : 0;
}

function checkLength(field: string, value: string, limit: number): void {
  if (value.length > limit) throw new CloudError('TANDEM_FIELD_TOO_LONG', { field, actual: `${value.length} characters`, limit: `${limit} characters` });
}

/** The Hello's strings that are persisted, bounded before anything else is done. */
function checkHelloStrings(hello: Hello): void {
  checkLength('hello.client_build', hello.clientBuild, HELLO_STRING_LIMITS.clientBuild);
  const methods = hello.training.methods;
  if (methods.length > HELLO_STRING_LIMITS.methods) {
    throw new CloudError('TANDEM_FIELD_TOO_LONG', { field: 'hello.training.methods', actual: `${methods.length} entries`, limit: `${HELLO_STRING_LIMITS.methods} entries` });
  }
  methods.forEach((m, i) => checkLength(`hello.training.methods[${i}]`, m, HELLO_STRING_LIMITS.method));
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

export class SessionService {
  readonly #options: SessionServiceOptions;
  readonly #runtimes = new Map<string, SessionRuntime>();
  /** Each tenant's error-feedback residuals, all its sessions together (its feedbackBytes quota). */
  readonly #feedbackLedgers = new Map<string, FeedbackLedger>();
  /** When each session last saw a request (ms); sessions loaded from disk start at their updatedAt. */
  readonly #activity = new Map<string, number>();
  /** Hellos past the openSessions check whose held adapter is being checkpointed, the record not yet added: counted open meanwhile. */
  readonly #opening = new OpenSessionCounts();
  readonly #lifetimes: SessionLifetimes;

  constructor(options: SessionServiceOptions) {
    this.#options = options;
    options.metrics.feedbackBytesNow = () => {
      let bytes = 0;
      for (const ledger of this.#feedbackLedgers.values()) bytes += ledger.bytes;
      return bytes;
    };
    this.#lifetimes = {
      idleMs: options.lifetimes?.idleMs ?? DEFAULT_SESSION_IDLE_MS,
      closedRetentionMs: options.lifetimes?.closedRetentionMs ?? DEFAULT_CLOSED_RETENTION_MS,
      closedPerTenant: options.lifetimes?.closedPerTenant ?? DEFAULT_CLOSED_SESSIONS_PER_TENANT,
    };
  }

  get lifetimes(): Readonly<SessionLifetimes> {
    return this.#lifetimes;
  }

  #touch(sessionId: string): void {
    this.#activity.set(sessionId, Date.now());
  }

  /**
   * Closes open sessions idle for longer than `idleMs` (reason `expired`) and forgets closed
   * ones older than `closedRetentionMs`. The node runs it periodically.
   */
  async sweep(now = Date.now()): Promise<{ expired: number; pruned: number }> {
    let expired = 0;
    let pruned = 0;
    for (const s of [...this.#options.store.all()]) {
      if (s.state === 'open') {
        const last = this.#activity.get(s.id) ?? Date.parse(s.updatedAt);
        if (now - last > this.#lifetimes.idleMs) {
          await this.#closeRecord(s, 'expired');
          expired += 1;
        }
      } else if (now - Date.parse(s.closedAt ?? s.updatedAt) > this.#lifetimes.closedRetentionMs) {
        await this.#options.store.remove(s.id);
        this.#activity.delete(s.id);
        pruned += 1;
      }
    }
    return { expired, pruned };
  }

  async #closeRecord(session: SessionRecord, reason: CloseReason): Promise<void> {
    await this.#options.store.update(session.id, (s) => {
      s.state = 'closed';
      s.closedAt = new Date().toISOString();
      s.closeReason = reason;
    });
    this.#options.cache.dropSession(session.id);
    this.#options.inference?.end(session.id);
    if (session.training.middleAdapter !== undefined) await this.#options.held?.drop(session.id, session.tenant);
    this.#runtimes.get(session.id)?.feedback?.clear();
    this.#runtimes.delete(session.id);
    this.#activity.delete(session.id);
    this.#options.metrics.sessionsOpen.set(this.#options.store.openCount);
    await this.#pruneClosed(session.tenant);
  }

  /** Keeps at most `closedPerTenant` closed sessions of a tenant, forgetting the oldest. */
  async #pruneClosed(tenant: string): Promise<void> {
    const closed = [...this.#options.store.all()].filter((s) => s.tenant === tenant && s.state === 'closed');
    if (closed.length <= this.#lifetimes.closedPerTenant) return;
    closed.sort((a, b) => (a.closedAt ?? a.updatedAt).localeCompare(b.closedAt ?? b.updatedAt));
    for (const s of closed.slice(0, closed.length - this.#lifetimes.closedPerTenant)) await this.#options.store.remove(s.id);
  }

  /** The reply to one request envelope. Throws CloudError or ProtocolError for the transport to report. */
  async handle(caller: Caller, request: Envelope): Promise<Reply> {
    const body = request.body;
    switch (body.case) {
      case 'hello':
        return this.#plain(request, await this.#hello(caller, body.value));
      case 'sessionOpen':
        return this.#plain(request, await this.#open(caller, body.value));
      case 'forward':
        return this.#step(caller, request, 'forward', body.value);
      case 'backward':
        return this.#step(caller, request, 'backward', body.value);
      case 'heartbeat':
        return this.#plain(request, this.#heartbeat(caller, body.value));
      case 'sessionClose':
        return this.#plain(request, await this.close(caller, body.value.sessionId, body.value));
      case 'inferStep':
        return this.#inferStep(caller, request, body.value);
      case 'stepCommit':
        return this.#stepCommit(caller, request, body.value);
      case 'inferEnd': {
        this.#options.store.getOpen(caller, body.value.sessionId);
        this.#options.inference?.end(body.value.sessionId);
        return this.#plain(request, { case: 'inferEnd', value: { sessionId: body.value.sessionId } });
      }
      default:
        throw new CloudError('TANDEM_MESSAGE_UNEXPECTED', { kind: body.case });
    }
  }

  /** Closes a session (socket SessionClose or REST DELETE); closing a closed session is a no-op. */
  async close(caller: Caller, sessionId: string, request: Partial<SessionClose> = {}): Promise<Body> {
    const session = this.#options.store.get(caller, sessionId);
    if (session.state === 'open') await this.#closeRecord(session, request.reason ?? 'unspecified');
    return { case: 'sessionClose', value: { sessionId, reason: session.closeReason ?? 'unspecified', message: request.message ?? '' } };
  }

  #plain(request: Envelope, body: Body, limits: Limits = this.#options.limits): Reply {
    return { bytes: encodeEnvelope(envelope(request.requestId, body)), maxMessageBytes: limits.maxMessageBytes };
  }

  async #hello(caller: Caller, hello: Hello): Promise<Body> {
    checkHelloStrings(hello);
    this.#options.quotas.checkOpenSessions(caller.tenant, this.#options.store.openCountOf(caller.tenant) + this.#opening.of(caller.tenant));
    const { served } = this.#options.model();
    checkLimitFloors(hello.limits, 'hello.limits');
    const version = negotiateVersion(hello.versions);
    if (hello.model.id !== served.id) throw new CloudError('TANDEM_MODEL_UNKNOWN', { model: JSON.stringify(hello.model.id), served: served.id });
    served.checkContentHash(hello.model.contentHash);
    // A Hello without a cut (proto3 zeros: top 0 is never valid) asks for the default.
    const cut = hello.cut.bottom === 0 && hello.cut.top === 0 ? served.defaultCut : { ...hello.cut };
    served.checkCut(cut);
    if (hello.training.cloudMiddleLora && hello.training.middleAdapter === undefined) {
      throw new CloudError('TANDEM_FEATURE_UNSUPPORTED', { feature: 'LoRA held by the cloud on the middle blocks by the 1.0 flag (training.cloud_middle_lora); ask with training.middle_adapter (protocol 1.3)' });
    }
    const offer = withDefaultOffer(hello.codecs);
    const codecs = negotiateCodecs(offer, this.#preferencesFor(offer));
    checkCodecParameters(codecs);
    const limits = intersectLimits(hello.limits, this.#options.limits);
    // No frame may hold more than a micro-batch of hidden states.
    limits.maxElements = Math.min(limits.maxElements, this.#maxTokens * served.config.hiddenSize);
    const now = new Date().toISOString();
    const record: SessionRecord = {
      id: randomUUID(),
      tenant: caller.tenant,
      modelId: served.id,
      contentHash: served.contentHash,
      version,
      cut,
      codecs,
      limits,
      training: { ...hello.training, methods: [...hello.training.methods], ...(hello.training.middleAdapter ? { middleAdapter: { ...hello.training.middleAdapter, targets: [...hello.training.middleAdapter.targets] } } : {}) },
      // The middle does not compute on NaN or infinities, whatever the edge allows itself.
      allowNonFinite: false,
      ...(hello.defenses ? { defenses: hello.defenses.map((d) => ({ ...d })) } : {}),
      clientBuild: hello.clientBuild,
      state: 'open',
      lastStep: -1,
      createdAt: now,
      updatedAt: now,
    };
    const spec = hello.training.middleAdapter;
    let held: HeldAdapter | undefined;
    if (spec !== undefined) {
      // The awaits before the record is added (the tenant's held bytes, the checkpoint); from
      // there the store counts it before its own first await.
      this.#opening.add(caller.tenant, 1);
      let release: (() => void) | undefined;
      try {
        ({ adapter: held, release } = await this.#createHeld(caller.tenant, record, spec));
        await this.#options.held?.add(held);
      } catch (err) {
        // Its checkpoint could not be written: no copy stays counted against the tenant.
        if (held !== undefined) await this.#options.held?.drop(record.id, caller.tenant).catch(() => undefined);
        throw err;
      } finally {
        release?.();
        this.#opening.add(caller.tenant, -1);
      }
    }
    try {
      await this.#options.store.add(record);
    } catch (err) {
      if (held !== undefined) await this.#options.held?.drop(record.id, caller.tenant);
      throw err;
    }
    this.#touch(record.id);
    this.#options.metrics.sessionsCreated.inc();
    this.#options.metrics.sessionsOpen.set(this.#options.store.openCount);
    return { case: 'welcome', value: welcomeOf(record) };
  }

  /** The session's middle adapter, created from its seed; the node must run held adapters and the tenant's quotas must allow it. */
  async #createHeld(tenant: string, record: SessionRecord, spec: NonNullable<Hello['training']['middleAdapter']>): Promise<{ adapter: HeldAdapter; release: () => void }> {
    const { served, executor } = this.#options.model();
    const held = this.#options.held;
    if (held === undefined || executor.holdsAdapters !== true || executor.forwardHeld === undefined) {
      throw new CloudError('TANDEM_FEATURE_UNSUPPORTED', { feature: `a middle adapter held by the cloud (training.middle_adapter) on a ${executor.backend} middle` });
    }
    const quotas = this.#options.quotas.of(tenant);
    if (spec.rank > quotas.heldAdapterRank) throw quotaExceeded(tenant, 'heldAdapterRank', quotas.heldAdapterRank, `the middle adapter asks for rank ${spec.rank}`);
    const range = served.middleOf(record.cut);
    if (range.end <= range.start) throw new CloudError('TANDEM_CUT_INVALID', { bottom: record.cut.bottom, top: record.cut.top, reason: 'the cut leaves no middle block for a middle adapter' });
    const layers = Array.from({ length: range.end - range.start }, (_, i) => range.start + i);
    const adapter = HeldAdapter.create(served.model, record.id, tenant, spec, layers);
    const release = await held.admit(tenant, adapter.bytes, quotas.heldAdapterBytes,
      (resident) => quotaExceeded(tenant, 'heldAdapterBytes', quotas.heldAdapterBytes, `the tenant's held adapters take ${resident} bytes and this one ${adapter.bytes}`));
    return { adapter, release };
  }

  /** StepCommit: the middle adapter's optimizer step, one commit of a session at a time; a repeat answers the same. */
  async #stepCommit(caller: Caller, request: Envelope, commit: StepCommit): Promise<Reply> {
    const session = this.#options.store.getOpen(caller, commit.sessionId);
    this.#touch(session.id);
    if (session.training.middleAdapter === undefined) throw new CloudError('TANDEM_FEATURE_UNSUPPORTED', { feature: 'StepCommit for a session without a middle adapter held by the cloud' });
    const runtime = this.#runtime(session.id);
    const run = async (): Promise<Body> => {
      // Read when the commit runs (after this session's commits before it): on a cluster's gateway, as last checkpointed.
      const held = await this.#heldOf(session);
      if (held === undefined) throw new CloudError('TANDEM_INTERNAL', { reason: 'a session with a middle adapter has none' });
      const { answer, applied } = held.commit(commit);
      if (applied) await this.#options.held?.save(held);
      this.#options.metrics.heldCommits.inc({ outcome: applied ? 'applied' : 'repeat' });
      const frames = commit.exportAdapter ? held.tensors().map((t) => encodeTensor(t.data, t.shape, { codec: 'f32' }, { name: t.key })) : [];
      return { case: 'stepCommitted', value: { sessionId: session.id, step: answer.step, middleGradSquareSum: answer.middleGradSquareSum, frames } };
    };
    const pending = (runtime.commits ?? Promise.resolve()).then(run, run);
    runtime.commits = pending.catch(() => undefined);
    return this.#plain(request, await pending, session.limits);
  }

  /** The session's held adapter; a session that asked for one never computes without it. */
  async #heldOf(session: SessionRecord): Promise<HeldAdapter | undefined> {
    if (session.training.middleAdapter === undefined) return undefined;
    const held = await this.#options.held?.get(session.id, session.tenant);
    if (held === undefined) {
      throw new CloudError('TANDEM_STATE_INVALID', { file: `held/${session.id}`, reason: 'the session holds a middle adapter and its checkpoint is missing (on a cluster: removed by a close on another gateway, or the JetStream state was lost)' });
    }
    return held;
  }

  /**
   * The largest request a session can need to send: a Backward of two frames (g_M, and h_B
   * again for a recompute) of a full micro-batch in f32. Chunked requests reassemble up to this.
   */
  get maxRequestBytes(): number {
    const { served } = this.#options.model();
    return 2 * Math.min(this.#options.limits.maxFrameBytes, this.#maxTokens * served.config.hiddenSize * 4);
  }

  get #maxTokens(): number {
    return this.#options.shapeLimits?.maxMicrobatchTokens ?? DEFAULT_MAX_MICROBATCH_TOKENS;
  }

  /** The edge's offer, in its order, restricted to what the node accepts. */
  #preferencesFor(offer: CodecOffer): CodecPreferences {
    const accepted = this.#options.codecs ?? ALL_CODECS;
    const order = (specs: readonly CodecSpec[], allowed: readonly CodecName[]): CodecName[] => specs.map((s) => s.codec).filter((c) => allowed.includes(c));
    return { forward: order(offer.forward, accepted.forward), backward: order(offer.backward, accepted.backward) };
  }

  async #open(caller: Caller, open: SessionOpen): Promise<Body> {
    const session = this.#options.store.getOpen(caller, open.sessionId);
    this.#touch(session.id);
    // The edge resumes at `resumeStep` (e.g. from a checkpoint): replies of later steps are
    // of a run it abandoned, and the step order restarts there.
    this.#options.cache.dropReplies(session.id, (reply) => reply.step > open.resumeStep);
    if (session.lastStep > open.resumeStep) await this.#options.store.update(session.id, (s) => { s.lastStep = open.resumeStep; });
    return { case: 'welcome', value: welcomeOf(session) };
  }

  #heartbeat(caller: Caller, beat: Heartbeat): Body {
    if (beat.sessionId !== '') {
      this.#options.store.getOpen(caller, beat.sessionId);
      this.#touch(beat.sessionId);
    }
    return { case: 'heartbeat', value: { sessionId: beat.sessionId, sequence: beat.sequence, sentAtMs: Date.now() } };
  }

  #runtime(sessionId: string): SessionRuntime {
    let runtime = this.#runtimes.get(sessionId);
    if (runtime === undefined) {
      runtime = { inFlight: new Map() };
      this.#runtimes.set(sessionId, runtime);
    }
    return runtime;
  }

  async #step(caller: Caller, request: Envelope, kind: StepKind, message: Forward | Backward): Promise<Reply> {
    const session = this.#options.store.getOpen(caller, message.sessionId);
    this.#touch(session.id);
    const runtime = this.#runtime(session.id);
    const key = replyKey(kind, message.step, message.microbatch);
    let reply: ComputedReply | undefined = this.#options.cache.getReply(session.id, key);
    if (reply === undefined) {
      // A retry that arrives while the first attempt computes waits for it.
      let pending = runtime.inFlight.get(key);
      if (pending === undefined) {
        pending = this.#compute(session, runtime, kind, message, request.requestId);
        runtime.inFlight.set(key, pending);
        pending.then(() => runtime.inFlight.delete(key), () => runtime.inFlight.delete(key));
      }
      reply = await pending;
    } else {
      this.#options.metrics.replays.inc({ kind });
    }
    // A retry under another request id gets the same body under its own id.
    const bytes = reply.requestId === request.requestId ? reply.bytes : encodeEnvelope(envelope(request.requestId, decodeEnvelope(reply.bytes, { maxMessageBytes: reply.bytes.length }).body));
    return { bytes, maxMessageBytes: session.limits.maxMessageBytes };
  }

  async #compute(session: SessionRecord, runtime: SessionRuntime, kind: StepKind, message: Forward | Backward, requestId: string): Promise<ComputedReply> {
    // A shape no session may send is refused as such, before the tenant's quota is charged;
    // then the tenant's tokens in flight are bounded before any work (TANDEM_QUOTA_EXCEEDED).
    const first = message.frames[0];
    if (first !== undefined) this.#checkDeclaredShape(first, kind === 'forward' ? 'forward.frames[0] (h_B)' : 'backward.frames[0] (g_M)');
    const release = this.#options.quotas.reserveTokens(session.tenant, tokensOf(message.frames[0]));
    let body: Body;
    try {
      body = kind === 'forward' ? await this.#forward(session, runtime, message as Forward) : await this.#backward(session, runtime, message as Backward);
    } finally {
      release();
    }
    const reply: ComputedReply = { requestId, bytes: encodeEnvelope(envelope(requestId, body)) };
    this.#options.metrics.steps.inc({ kind });
    this.#options.onComputed?.({ session, kind, message, tokens: tokensOf(message.frames[0]) });
    if (this.#runtimes.get(session.id) !== runtime) return reply; // closed meanwhile
    this.#options.cache.putReply({ sessionId: session.id, key: replyKey(kind, message.step, message.microbatch), step: message.step, requestId, bytes: reply.bytes });
    if (message.step > session.lastStep) {
      await this.#options.store.update(session.id, (s) => { s.lastStep = message.step; });
      // Replies are kept for the last two steps: enough for the retries of a step in flight.
      this.#options.cache.dropReplies(session.id, (old) => old.step < message.step - 1);
    }
    return reply;
  }

  async #forward(session: SessionRecord, runtime: SessionRuntime, forward: Forward): Promise<Body> {
    if (forward.step < session.lastStep) {
      throw new CloudError('TANDEM_STEP_STALE', { session: session.id, step: forward.step, lastStep: session.lastStep });
    }
    if (forward.frames.length !== 1) throw new CloudError('TANDEM_FRAME_COUNT_INVALID', { kind: 'Forward', actual: forward.frames.length, expected: '1 (h_B)' });
    const { served, executor } = this.#options.model();
    const [h, shape] = this.#readFrame(session, forward.frames[0], 'forward.frames[0] (h_B)');
    const started = performance.now();
    const range = served.middleOf(session.cut);
    let out: Float32Array;
    const held = await this.#heldOf(session);
    // What a backward will need is kept only for a session still open when the compute ends: a
    // session closed meanwhile has dropped its entries, and nothing could take them again.
    const open = (): boolean => this.#runtimes.get(session.id) === runtime;
    if (held !== undefined && executor.forwardHeld !== undefined) {
      out = await executor.forwardHeld(range, h, shape, session.tenant, held.lora());
      if (forward.needsBackward && open()) this.#options.cache.put({ sessionId: session.id, step: forward.step, microbatch: forward.microbatch, data: h, shape });
    } else if (forward.needsBackward) {
      const taped = await executor.forwardKeepingTape(range, h, shape, session.tenant, { h: forward.frames[0] });
      out = taped.output;
      if (open()) this.#options.cache.put({ sessionId: session.id, step: forward.step, microbatch: forward.microbatch, data: h, shape, tape: taped.tape });
      else taped.tape?.dispose();
    } else {
      out = await executor.forward(range, h, shape, session.tenant, { h: forward.frames[0] });
    }
    this.#options.metrics.latency.observe({ kind: 'forward' }, (performance.now() - started) / 1000);
    this.#checkFinite(session, out, 'h_M', forward.step);
    const frame = encodeTensor(out, shape, session.codecs.forward, { name: 'h_M', allowNonFinite: session.allowNonFinite });
    this.#options.metrics.frame('out', frame.codec, frameBytes(frame));
    return { case: 'forwardResult', value: { sessionId: session.id, step: forward.step, microbatch: forward.microbatch, frames: [frame] } };
  }

  async #backward(session: SessionRecord, runtime: SessionRuntime, backward: Backward): Promise<Body> {
    const n = backward.frames.length;
    if (n !== 1 && n !== 2) throw new CloudError('TANDEM_FRAME_COUNT_INVALID', { kind: 'Backward', actual: n, expected: '1 (g_M) or 2 (g_M, h_B)' });
    const { served, executor } = this.#options.model();
    const [g, shape] = this.#readFrame(session, backward.frames[0], 'backward.frames[0] (g_M)');
    const cached = this.#options.cache.get(session.id, backward.step, backward.microbatch);
    let h: Float32Array;
    let hShape: Shape3;
    if (n === 2) {
      [h, hShape] = this.#readFrame(session, backward.frames[1], 'backward.frames[1] (h_B)');
    } else if (cached !== undefined) {
      ({ data: h, shape: hShape } = cached);
    } else {
      throw new CloudError('TANDEM_ACTIVATIONS_GONE', {
        session: session.id, step: backward.step, microbatch: backward.microbatch,
        reason: 'evicted by the memory budget or the time limit, lost in a restart, or the Forward had needs_backward false',
      });
    }
    if (!sameShape(shape, hShape)) {
      throw new CloudError('TANDEM_SHAPE_MISMATCH', { field: 'backward.frames[0] (g_M)', actual: `[${shape.join(', ')}]`, expected: `[${hShape.join(', ')}] (h_B)` });
    }
    const started = performance.now();
    let out: Float32Array | undefined;
    const held = await this.#heldOf(session);
    if (held !== undefined && executor.backwardHeld !== undefined) {
      // The held adapter's gradients are checkpointed before g_B goes out: an acknowledged backward is never lost.
      const result = await executor.backwardHeld(served.middleOf(session.cut), h, g, shape, session.tenant, held.lora());
      held.accumulate(backward.step, backward.microbatch, result.loraGrads);
      await this.#options.held?.saveGradients(held, backward.step, backward.microbatch);
      out = result.output;
    }
    if (out === undefined && cached?.tape) {
      try {
        out = await executor.backwardFromTape(cached.tape, g, shape, session.tenant, { g: backward.frames[0] });
      } catch (err) {
        // The worker that kept the tape restarted: recompute from the h_B kept beside it.
        if (!(err instanceof TapeLost)) throw err;
      }
    }
    out ??= await executor.backward(served.middleOf(session.cut), h, g, shape, session.tenant, { g: backward.frames[0], h: n === 2 ? backward.frames[1] : undefined });
    this.#options.metrics.latency.observe({ kind: 'backward' }, (performance.now() - started) / 1000);
    // The edge resent h_B (the cloud had nothing of this micro-batch left).
    const recomputed = cached === undefined;
    if (recomputed) this.#options.metrics.recomputes.inc();
    this.#options.cache.delete(session.id, backward.step, backward.microbatch);
    this.#checkFinite(session, out, 'g_B', backward.step);
    const frame = this.#encodeGradient(session, runtime, backward.microbatch, out, shape);
    this.#options.metrics.frame('out', frame.codec, frameBytes(frame));
    return { case: 'backwardResult', value: { sessionId: session.id, step: backward.step, microbatch: backward.microbatch, frames: [frame], recomputed } };
  }

  /** A result holding NaN or an infinity is refused when the session forbids them, instead of being sent. */
  #checkFinite(session: SessionRecord, data: Float32Array, name: string, step: number): void {
    if (session.allowNonFinite) return;
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i])) throw new CloudError('TANDEM_RESULT_NON_FINITE', { field: name, index: i, session: session.id, step });
    }
  }

  /**
   * g_B in the backward codec; a lossy one goes through the session's error feedback, one stream
   * per micro-batch index (the edge's to name: the residuals are held to DEFAULT_FEEDBACK_BYTES a
   * session and to the tenant's feedbackBytes quota for all its sessions, the least recently used
   * given up first).
   */
  #encodeGradient(session: SessionRecord, runtime: SessionRuntime, microbatch: number, data: Float32Array, shape: Shape3): TensorFrame {
    const spec = session.codecs.backward;
    if (spec.codec === 'f32') return encodeTensor(data, shape, spec, { name: 'g_B' });
    // Closed while it computed: its feedback was given back, and no later Backward follows.
    if (this.#runtimes.get(session.id) !== runtime) return encodeTensor(data, shape, spec, { name: 'g_B' });
    runtime.feedback ??= new ErrorFeedback(spec, { ledger: this.#feedbackLedger(session.tenant) });
    const stream = `g_B/${microbatch}`;
    const residual = runtime.feedback.residual(stream);
    if (residual !== undefined && residual.length !== data.length) runtime.feedback.reset(stream);
    return runtime.feedback.encode(stream, data, shape, { name: 'g_B' });
  }

  #feedbackLedger(tenant: string): FeedbackLedger {
    let ledger = this.#feedbackLedgers.get(tenant);
    if (ledger === undefined) {
      ledger = new FeedbackLedger(this.#options.quotas.of(tenant).feedbackBytes);
      this.#feedbackLedgers.set(tenant, ledger);
    }
    return ledger;
  }

  /** Validates a received hidden-state frame against the session and the model, and decodes it. */
  /** Split inference: the middle on the new tokens' h_B, with the session's middle KV cache. */
  async #inferStep(caller: Caller, request: Envelope, step: InferStep): Promise<Reply> {
    const inference = this.#options.inference;
    if (inference === undefined) throw new CloudError('TANDEM_FEATURE_UNSUPPORTED', { feature: 'split inference (InferStep)' });
    const session = this.#options.store.getOpen(caller, step.sessionId);
    this.#touch(session.id);
    if (step.frames.length !== 1) throw new CloudError('TANDEM_FRAME_COUNT_INVALID', { kind: 'InferStep', actual: step.frames.length, expected: '1 (h_B)' });
    const { served } = this.#options.model();
    const [h, shape] = this.#readFrame(session, step.frames[0], 'infer_step.frames[0] (h_B)');
    const release = this.#options.quotas.reserveTokens(session.tenant, shape[0] * shape[1]);
    let out: Float32Array;
    try {
      out = await inference.step(served, served.middleOf(session.cut), session, step.position, h, shape);
    } finally {
      release();
    }
    this.#checkFinite(session, out, 'h_M', 0);
    const frame = encodeTensor(out, shape, session.codecs.forward, { name: 'h_M', allowNonFinite: session.allowNonFinite });
    this.#options.metrics.frame('out', frame.codec, frameBytes(frame));
    return this.#plain(request, { case: 'inferStepResult', value: { sessionId: session.id, position: step.position, frames: [frame] } }, session.limits);
  }

  #readFrame(session: SessionRecord, frame: TensorFrame, field: string): [Float32Array, Shape3] {
    const s = this.#checkDeclaredShape(frame, field);
    const expectation = { limits: session.limits, allowNonFinite: session.allowNonFinite, field };
    validateFrame(frame, expectation);
    const data = decodeTensor(frame, expectation);
    this.#options.metrics.frame('in', frame.codec, frameBytes(frame));
    return [data, [s[0], s[1], s[2]]];
  }

  /** The frame's declared shape against the session's shape limits; what a request may cost is known from it. */
  #checkDeclaredShape(frame: TensorFrame, field: string): readonly number[] {
    const { served } = this.#options.model();
    const { hiddenSize, maxPositionEmbeddings } = served.config;
    const maxSeq = Math.min(maxPositionEmbeddings, this.#options.shapeLimits?.maxSequenceLength ?? maxPositionEmbeddings);
    // The declared shape, before the frame is validated or decoded: a top-k frame of a few
    // bytes may declare any shape, and decoding allocates (and the middle computes) all of it.
    const s = frame.shape;
    if (s.length !== 3 || s[0] < 1 || s[1] < 1 || s[1] > maxSeq || s[2] !== hiddenSize) {
      throw new CloudError('TANDEM_SHAPE_MISMATCH', { field, actual: `[${s.slice(0, 8).join(', ')}${s.length > 8 ? ', ...' : ''}]`, expected: `[batch >= 1, 1 <= seq <= ${maxSeq}, ${hiddenSize}]` });
    }
    const tokens = s[0] * s[1];
    if (tokens > this.#maxTokens) {
      throw new CloudError('TANDEM_MICROBATCH_TOO_LARGE', { field, actual: tokens, limit: this.#maxTokens });
    }
    return s;
  }
}

/** A trial encode of one element with each chosen codec: bad parameters fail the Hello, not a step after its compute. */
function checkCodecParameters(codecs: CodecChoice): void {
  for (const [direction, spec] of Object.entries(codecs) as [string, CodecSpec][]) {
    try {
      encodeTensor(new Float32Array(1), [1], spec);
    } catch (err) {
      throw new CloudError('TANDEM_CODEC_PARAMS_INVALID', { direction, codec: spec.codec, reason: err instanceof Error ? err.message : String(err) }, { cause: err });
    }
  }
}

function withDefaultOffer(offer: CodecOffer): CodecOffer {
  // An edge that states no codec for a direction gets f32.
  return {
    forward: offer.forward.length > 0 ? offer.forward : [{ codec: 'f32' }],
    backward: offer.backward.length > 0 ? offer.backward : [{ codec: 'f32' }],
  };
}

export function welcomeOf(s: SessionRecord): Welcome {
  return {
    version: { ...s.version },
    serverBuild: SERVER_BUILD,
    sessionId: s.id,
    model: { id: s.modelId, contentHash: s.contentHash },
    codecs: s.codecs,
    limits: s.limits,
    cut: s.cut,
    training: s.training,
    allowNonFinite: s.allowNonFinite,
    ...(s.defenses && s.defenses.length > 0 ? { defenses: s.defenses.map((d) => ({ ...d })) } : {}),
  };
}
