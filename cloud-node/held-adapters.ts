// Middle adapters the cloud holds for sessions (protocol 1.3): created at Hello from the
// session's seed with model/peft's own init (so the adapter is the one the edge's local
// training would create), trained by the backward's gradients, stepped by the edge's
// StepCommit with AdamW (torch's rule, as model/train's), and checkpointed in the state
// folder (the whole adapter at each commit, each backward's gradients on their own), so that
// a node killed mid-training resumes with no step lost or applied twice. Freed when the
// session closes or expires.
import { HELD_IA3_FEEDFORWARD, PEFT_MODULE_PREFIX, createAdapter, heldMethodSpec } from '../model/index.ts';
import type { LlamaModel } from '../model/index.ts';
import { ProtocolError } from '../protocol/index.ts';
import type { MiddleAdapterSpec, StepCommit } from '../protocol/index.ts';
import { CloudError } from './errors.ts';
import type { HeldIa3Module, HeldLora, HeldModule } from './middle-compute.ts';
import { heldBytes } from './state/held-adapter-store.ts';
import type { HeldAdapterSnapshot, HeldCheckpoints } from './state/held-adapter-store.ts';

const A_SUFFIX = '.lora_A.weight';
const B_SUFFIX = '.lora_B.weight';
const IA3_SUFFIX = '.ia3_l';

/** One module's tensors by PEFT key, with AdamW's buffers. */
interface Param {
  key: string;
  shape: [number, number];
  value: Float32Array;
  expAvg: Float32Array;
  expAvgSq: Float32Array;
}

/** What a commit answered, kept so that its repeat answers the same. */
export interface CommitAnswer {
  step: number;
  middleGradSquareSum: number;
}

/** The session's middle LoRA, its AdamW state and the gradients of the step in progress. */
export class HeldAdapter {
  readonly sessionId: string;
  readonly tenant: string;
  readonly spec: MiddleAdapterSpec;
  readonly layers: readonly number[];
  readonly #scale: number;
  /** A then B of each module, in model order. */
  readonly #params: Param[];
  #optimizerSteps: number;
  #last: CommitAnswer | undefined;
  /** The step whose backwards `#grads` holds, and each micro-batch's gradients (one per param). */
  #pendingStep: number | undefined;
  readonly #grads = new Map<number, Float32Array[]>();

  private constructor(sessionId: string, tenant: string, spec: MiddleAdapterSpec, layers: readonly number[], params: Param[], optimizerSteps: number, last: CommitAnswer | undefined) {
    this.sessionId = sessionId;
    this.tenant = tenant;
    this.spec = spec;
    this.layers = layers;
    this.#scale = spec.method === 'lora' ? spec.alpha / spec.rank : 1;
    this.#params = params;
    this.#optimizerSteps = optimizerSteps;
    this.#last = last;
  }

  /** A new adapter on `layers` of the served model, initialised as model/peft's createAdapter does for method `methodIndex` of `seed`. */
  static create(model: LlamaModel, sessionId: string, tenant: string, spec: MiddleAdapterSpec, layers: readonly number[]): HeldAdapter {
    let adapter;
    try {
      adapter = createAdapter(model, [heldMethodSpec(spec, layers)], { seed: spec.seed, methodOffset: spec.methodIndex });
    } catch (cause) {
      throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: 'hello.training.middle_adapter', reason: (cause as Error).message.slice(0, 300) }, { cause });
    }
    try {
      const params: Param[] = [];
      for (const [key, t] of adapter.state()) {
        const shape = t.variable.shape as [number, number];
        const value = Float32Array.from(t.variable.dataSync() as Float32Array);
        params.push({ key, shape, value, expAvg: new Float32Array(value.length), expAvgSq: new Float32Array(value.length) });
      }
      return new HeldAdapter(sessionId, tenant, spec, layers, orderParams(params, spec.method), 0, undefined);
    } finally {
      adapter.dispose();
    }
  }

  /** The adapter as checkpointed (restart). */
  static fromSnapshot(s: HeldAdapterSnapshot): HeldAdapter {
    const params = s.params.map((p) => ({ key: p.key, shape: p.shape, value: p.value, expAvg: p.expAvg, expAvgSq: p.expAvgSq }));
    const held = new HeldAdapter(s.sessionId, s.tenant, s.spec, s.layers, orderParams(params, s.spec.method), s.optimizerSteps, s.last);
    if (s.pending !== undefined) {
      held.#pendingStep = s.pending.step;
      for (const [mb, grads] of s.pending.microbatches) held.#grads.set(mb, grads);
    }
    return held;
  }

  snapshot(): HeldAdapterSnapshot {
    return {
      sessionId: this.sessionId, tenant: this.tenant, spec: this.spec, layers: [...this.layers], optimizerSteps: this.#optimizerSteps, last: this.#last,
      params: this.#params.map((p) => ({ key: p.key, shape: p.shape, value: p.value, expAvg: p.expAvg, expAvgSq: p.expAvgSq })),
      ...(this.#pendingStep !== undefined ? { pending: { step: this.#pendingStep, microbatches: [...this.#grads].sort((a, b) => a[0] - b[0]) } } : {}),
    };
  }

  /** Weights and AdamW buffers, bytes. */
  get bytes(): number {
    return heldBytes(this.#params);
  }

  /** The last step committed; undefined before the first. */
  get lastCommitted(): number | undefined {
    return this.#last?.step;
  }

  /** The factors as the compute workers take them (copies: a step in flight never sees them change). */
  lora(): HeldLora {
    if (this.spec.method === 'ia3') {
      const ia3: HeldIa3Module[] = this.#params.map((p) => {
        const path = p.key.slice(PEFT_MODULE_PREFIX.length, -IA3_SUFFIX.length);
        return { path, feedforward: HELD_IA3_FEEDFORWARD.some((f) => path.endsWith(`.${f}`)), scale: p.value.slice() };
      });
      return { scale: 1, modules: [], ia3 };
    }
    const modules: HeldModule[] = [];
    for (let i = 0; i < this.#params.length; i += 2) {
      const a = this.#params[i];
      const b = this.#params[i + 1];
      modules.push({ path: a.key.slice(PEFT_MODULE_PREFIX.length, -A_SUFFIX.length), a: a.value.slice(), b: b.value.slice(), r: a.shape[0], inFeatures: a.shape[1], outFeatures: b.shape[0] });
    }
    return { scale: this.#scale, modules };
  }

  /** A backward's factor gradients for (step, microbatch); a retry of the same micro-batch replaces, never adds. */
  accumulate(step: number, microbatch: number, grads: readonly Float32Array[]): void {
    if (grads.length !== this.#params.length || grads.some((g, i) => g.length !== this.#params[i].value.length)) {
      throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'the held adapter\'s gradients do not match its tensors' });
    }
    if (this.#last !== undefined && step <= this.#last.step) return; // a step already applied: nothing to add
    if (this.#pendingStep !== step) {
      this.#grads.clear();
      this.#pendingStep = step;
    }
    this.#grads.set(microbatch, grads.map((g) => g.slice()));
  }

  /** The gradients kept for (step, microbatch); undefined when that step is not the one in progress. */
  gradientsOf(step: number, microbatch: number): readonly Float32Array[] | undefined {
    return this.#pendingStep === step ? this.#grads.get(microbatch) : undefined;
  }

  /**
   * Applies the step: the micro-batches' gradients summed, clipped with the edge's (one norm
   * over both sides), AdamW. A repeat of the last committed step answers the same and
   * changes nothing; any other step but the next is TANDEM_PROTO_STEP_COMMIT_OUT_OF_ORDER.
   */
  commit(c: StepCommit): { answer: CommitAnswer; applied: boolean } {
    if (this.#last !== undefined && c.step === this.#last.step) return { answer: this.#last, applied: false };
    const expected = this.#last === undefined ? undefined : this.#last.step + 1;
    if ((expected !== undefined && c.step !== expected) || (expected === undefined && this.#pendingStep !== undefined && c.step !== this.#pendingStep)) {
      throw new ProtocolError('TANDEM_PROTO_STEP_COMMIT_OUT_OF_ORDER', { actual: c.step, session: this.sessionId, expected: expected ?? this.#pendingStep ?? 'the first step trained', last: this.#last?.step ?? 'none' });
    }
    for (const [field, v] of [['lr', c.lr], ['max_grad_norm', c.maxGradNorm], ['edge_grad_square_sum', c.edgeGradSquareSum]] as const) {
      if (!Number.isFinite(v) || v < 0) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: `step_commit.${field}`, reason: 'must be a finite number >= 0' });
    }
    const have = this.#pendingStep === c.step ? this.#grads.size : 0;
    if (have < c.microbatches) {
      throw new CloudError('TANDEM_HELD_GRADIENTS_MISSING', { session: this.sessionId, step: c.step, actual: have, expected: c.microbatches });
    }
    const sums = this.#params.map((p) => new Float32Array(p.value.length));
    for (const mb of [...this.#grads.keys()].sort((a, b) => a - b)) {
      const grads = this.#grads.get(mb) as Float32Array[];
      sums.forEach((s, i) => { for (let j = 0; j < s.length; j++) s[j] += grads[i][j]; });
    }
    let square = 0;
    for (const s of sums) {
      let part = 0;
      for (let j = 0; j < s.length; j++) part += s[j] * s[j];
      square += part;
    }
    if (c.maxGradNorm > 0) {
      const coef = c.maxGradNorm / (Math.sqrt(c.edgeGradSquareSum + square) + 1e-6);
      if (coef < 1) for (const s of sums) for (let j = 0; j < s.length; j++) s[j] *= coef;
    }
    this.#adamw(sums, c.lr, c.step);
    this.#last = { step: c.step, middleGradSquareSum: square };
    this.#grads.clear();
    this.#pendingStep = undefined;
    return { answer: this.#last, applied: true };
  }

  /**
   * torch.optim.AdamW: p ← p(1 − lr·λ) − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε), in
   * float32 buffers. A step that would leave a weight or a moment NaN or infinite (an lr of
   * 1e308, gradients that overflow float32) is refused and changes nothing: the adapter is
   * checkpointed after each step, so a poisoned one would stay poisoned across restarts.
   */
  #adamw(grads: readonly Float32Array[], lr: number, step: number): void {
    const t = this.#optimizerSteps + 1;
    const { beta1: b1, beta2: b2, eps, weightDecay: wd } = this.spec;
    const bc1 = 1 - b1 ** t;
    const bc2Sqrt = Math.sqrt(1 - b2 ** t);
    const f = Math.fround; // the buffers are float32: each stored value is rounded as stored
    // Twice over the elements, once to check and once to write, so that a refused step changes
    // nothing and costs no copy of the adapter and its moments.
    for (const write of [false, true]) {
      this.#params.forEach((p, i) => {
        const g = grads[i];
        const { value: w, expAvg: m, expAvgSq: v } = p;
        for (let j = 0; j < w.length; j++) {
          const mj = f(m[j] * b1 + g[j] * (1 - b1));
          const vj = f(v[j] * b2 + g[j] * g[j] * (1 - b2));
          const decayed = wd === 0 ? w[j] : w[j] * (1 - lr * wd);
          const wj = f(decayed - (mj / (Math.sqrt(vj) / bc2Sqrt + eps)) * (lr / bc1));
          if (write) {
            m[j] = mj;
            v[j] = vj;
            w[j] = wj;
          } else if (!Number.isFinite(wj) || !Number.isFinite(vj)) {
            throw new CloudError('TANDEM_RESULT_NON_FINITE', { field: `the held adapter's ${p.key} after the step (lr ${lr})`, index: j, session: this.sessionId, step });
          }
        }
      });
    }
    this.#optimizerSteps = t;
  }

  /** The adapter's tensors by PEFT key (export). */
  tensors(): { key: string; shape: number[]; data: Float32Array }[] {
    return this.#params.map((p) => ({ key: p.key, shape: [...p.shape], data: p.value.slice() }));
  }
}


/** LoRA: A then B of each module; (IA)^3: the scales; modules in the order PEFT's state lists them. */
function orderParams(params: Param[], method: MiddleAdapterSpec['method']): Param[] {
  if (method === 'ia3') {
    if (params.some((p) => !p.key.endsWith(IA3_SUFFIX))) throw new CloudError('TANDEM_INTERNAL', { reason: 'held (IA)^3 adapter has tensors other than ia3_l' });
    return params;
  }
  const out: Param[] = [];
  for (const a of params.filter((p) => p.key.endsWith(A_SUFFIX))) {
    const b = params.find((p) => p.key === a.key.slice(0, -A_SUFFIX.length) + B_SUFFIX);
    if (b === undefined) throw new CloudError('TANDEM_INTERNAL', { reason: `held adapter has ${a.key} without its lora_B` });
    out.push(a, b);
  }
  if (out.length !== params.length) throw new CloudError('TANDEM_INTERNAL', { reason: 'held adapter has tensors other than lora_A and lora_B' });
  return out;
}

function moved(sessionId: string, reason: string): CloudError {
  return new CloudError('TANDEM_HELD_ADAPTER_MOVED', { session: sessionId, reason });
}

export interface HeldAdapterMetrics {
  resident(count: number, bytes: number): void;
}

/** A cluster gateway's copy of a checkpoint not used for this long is let go (read again if the session comes back). */
export const IDLE_COPY_MS = 5 * 60_000;

/**
 * The node's held adapters, by session: quotas per tenant, checkpoints in the store. On a
 * cluster's gateway the checkpoints are shared (any gateway may serve the session next), and a
 * copy here is a cache of them: read when first used and again whenever another gateway wrote
 * since; a write that finds the checkpoint moved under it, or that fails, marks the copy stale
 * (TANDEM_HELD_ADAPTER_MOVED / TANDEM_HELD_CHECKPOINT_UNAVAILABLE, which the edge retries), and
 * every write queued behind it is refused alike, so nothing is acknowledged that is not in the
 * checkpoint; a copy not used for IDLE_COPY_MS is let go (checked at each use and every minute).
 */
export class HeldAdapters {
  readonly #store: HeldCheckpoints;
  readonly #byId = new Map<string, HeldAdapter>();
  readonly #metrics?: HeldAdapterMetrics;
  /** Writes of one session, one after another: the last one queued, while it is not settled. */
  readonly #writes = new Map<string, Promise<void>>();
  /** Copies whose write failed: ahead of the checkpoint or behind another gateway's; read again on next use. */
  readonly #stale = new WeakSet<HeldAdapter>();
  /** Copies of sessions closed or expired: their writes are nothing to keep (a copy let go idle is not one). */
  readonly #dropped = new WeakSet<HeldAdapter>();
  /** Bytes of adapters being created (Hellos between the quota check and their checkpoint), by tenant. */
  readonly #admitting = new Map<string, number>();
  /** When each copy was last used (shared stores), the least recently used first. */
  readonly #usedAt = new Map<string, number>();
  readonly #shared: boolean;
  readonly #idleCopyMs: number;
  #sweep: NodeJS.Timeout | undefined;

  private constructor(store: HeldCheckpoints, metrics?: HeldAdapterMetrics, idleCopyMs = IDLE_COPY_MS) {
    this.#store = store;
    this.#metrics = metrics;
    this.#shared = store.latest !== undefined;
    this.#idleCopyMs = idleCopyMs;
    // Idle copies go also when no held traffic comes (a gateway whose sessions all moved elsewhere).
    if (this.#shared) {
      this.#sweep = setInterval(() => this.#letIdleGo(), Math.min(60_000, idleCopyMs));
      this.#sweep.unref();
    }
  }

  /** Stops the idle sweep (the node closing). */
  close(): void {
    clearInterval(this.#sweep);
  }

  /** Loads every checkpointed adapter of the store; `idleCopyMs`: see IDLE_COPY_MS (shared stores). */
  static async open(store: HeldCheckpoints, metrics?: HeldAdapterMetrics, options: { idleCopyMs?: number } = {}): Promise<HeldAdapters> {
    const held = new HeldAdapters(store, metrics, options.idleCopyMs);
    for (const s of await store.loadAll()) held.#byId.set(s.sessionId, HeldAdapter.fromSnapshot(s));
    held.#report();
    return held;
  }

  get count(): number {
    return this.#byId.size;
  }

  get bytes(): number {
    let n = 0;
    for (const h of this.#byId.values()) n += h.bytes;
    return n;
  }

  /** The bytes of the tenant's held adapters: here, or on every gateway of a cluster (checkpointed ones). */
  async bytesOf(tenant: string): Promise<number> {
    if (this.#store.bytesOf !== undefined) return this.#store.bytesOf(tenant);
    let n = 0;
    for (const h of this.#byId.values()) if (h.tenant === tenant) n += h.bytes;
    return n;
  }

  /**
   * Admits a new adapter of `bytes` against the tenant's `limit` (its held adapters, those being
   * created here included: the check and the reservation are one step, whatever Hellos run at
   * once), or throws `refuse(resident)`. The release gives the reservation back once the adapter
   * is checkpointed (then counted as itself) or refused.
   */
  async admit(tenant: string, bytes: number, limit: number, refuse: (resident: number) => Error): Promise<() => void> {
    const resident = (await this.bytesOf(tenant)) + (this.#admitting.get(tenant) ?? 0);
    if (resident + bytes > limit) throw refuse(resident);
    this.#admitting.set(tenant, (this.#admitting.get(tenant) ?? 0) + bytes);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.#admitting.get(tenant) ?? bytes) - bytes;
      if (left <= 0) this.#admitting.delete(tenant);
      else this.#admitting.set(tenant, left);
    };
  }

  /** The session's adapter as last checkpointed (read again when another gateway wrote it since); undefined when it has none. */
  async get(sessionId: string, tenant: string): Promise<HeldAdapter | undefined> {
    if (this.#store.latest === undefined) return this.#byId.get(sessionId);
    this.#letIdleGo();
    // This process's own writes first: what they write is not another gateway's change.
    await this.#writes.get(sessionId);
    const mine = this.#byId.get(sessionId);
    if (mine === undefined || this.#stale.has(mine)) this.#store.forget?.(sessionId);
    const latest = await this.#store.latest(sessionId, tenant);
    if (latest === 'gone') {
      this.#letGo(sessionId);
      return undefined;
    }
    this.#used(sessionId);
    if (latest === 'same' && mine !== undefined && !this.#stale.has(mine)) return mine;
    if (latest === 'same') throw new CloudError('TANDEM_INTERNAL', { reason: 'a checkpoint read as unchanged with no copy here' });
    const held = HeldAdapter.fromSnapshot(latest);
    this.#byId.set(sessionId, held);
    this.#report();
    return held;
  }

  /** Keeps a new adapter and checkpoints it before the Welcome goes out. */
  async add(held: HeldAdapter): Promise<void> {
    this.#byId.set(held.sessionId, held);
    if (this.#shared) {
      this.#letIdleGo();
      this.#used(held.sessionId);
    }
    this.#report();
    await this.save(held);
  }

  /** Checkpoints the whole adapter (created, or a commit applied) and drops the gradient files it has applied; durable once it resolves. */
  save(held: HeldAdapter): Promise<void> {
    const snapshot = held.snapshot();
    return this.#write(held, () => this.#store.save(snapshot));
  }

  /** Checkpoints one backward's gradients of the step in progress (not the whole adapter again); durable once it resolves. */
  saveGradients(held: HeldAdapter, step: number, microbatch: number): Promise<void> {
    const grads = held.gradientsOf(step, microbatch)?.map((g) => g.slice());
    // A backward of a step already applied added nothing.
    if (grads === undefined) return Promise.resolve();
    return this.#write(held, () => this.#store.saveGradients(held.sessionId, step, microbatch, grads));
  }

  /** Writes of one session, one after another, while it is still held. */
  #write(held: HeldAdapter, write: () => Promise<void>): Promise<void> {
    const id = held.sessionId;
    const prev = this.#writes.get(id) ?? Promise.resolve();
    const next = prev.then(async () => {
      const current = this.#byId.get(id);
      // Dropped (closed, expired): nothing to keep. A copy let go meanwhile (idle) is read again: this write is refused.
      if (current === undefined && (!this.#shared || this.#dropped.has(held))) return;
      // A copy read again since, or one whose earlier write failed: what this change started from is not the checkpoint.
      if (current !== held || this.#stale.has(held)) throw moved(id, 'its checkpoint changed while this gateway computed, or an earlier write of it failed');
      try {
        await write();
      } catch (error) {
        // What this copy holds is ahead of the checkpoint, or behind another gateway's: read it again on next use.
        if (this.#shared) this.#stale.add(held);
        throw error;
      }
    });
    // The entry goes once the last write queued settles: a session with none has no entry.
    const settled = next.catch(() => undefined).then(() => {
      if (this.#writes.get(id) === settled) this.#writes.delete(id);
    });
    this.#writes.set(id, settled);
    return next;
  }

  #used(sessionId: string): void {
    this.#usedAt.delete(sessionId);
    this.#usedAt.set(sessionId, Date.now());
  }

  /** Frees the session's adapter and its checkpoint (close, expiry); on a cluster's gateway, whether or not it was read here. */
  async drop(sessionId: string, tenant: string): Promise<void> {
    const copy = this.#byId.get(sessionId);
    if (copy !== undefined) this.#dropped.add(copy);
    const here = this.#byId.delete(sessionId);
    this.#usedAt.delete(sessionId);
    if (here) this.#report();
    if (!here && !this.#shared) return;
    // Its entry goes by itself once the writes queued before this settle.
    await this.#writes.get(sessionId);
    await this.#store.remove(sessionId, tenant);
  }

  /** Lets this gateway's copy go (the checkpoint stays): gone elsewhere, or idle. */
  #letGo(sessionId: string): void {
    this.#usedAt.delete(sessionId);
    this.#store.forget?.(sessionId);
    if (this.#byId.delete(sessionId)) this.#report();
  }

  /** Copies not used for idleCopyMs and with no write queued: a session served elsewhere now, or closed there. */
  #letIdleGo(now = Date.now()): void {
    for (const [id, at] of this.#usedAt) {
      if (now - at < this.#idleCopyMs) break;
      if (this.#writes.has(id)) continue;
      this.#letGo(id);
    }
  }

  #report(): void {
    this.#metrics?.resident(this.count, this.bytes);
  }
}
