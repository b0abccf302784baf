// The middle executor: a pool of compute workers (middle-worker.ts, one thread each, each
// with the served model loaded once and the tapes of its forwards), fed from per-tenant
// queues served round-robin, so that one tenant's many or large requests do not hold back
// another's, and the event loop (REST, heartbeats, validation) never computes.
//
// The scheduler coalesces requests of one kind (forwards; backwards from one packed tape;
// backwards recomputing from h_B) that arrive within `batchWindowMs` into one backbone call
// of at most `maxBatchTokens` tokens, packed along the token axis (model/engine's
// PackedBlocks). A batch is filled tenant by tenant in weighted rounds (`tenantWeights`), a
// tenant's tokens in flight capped at `tenantTokensInFlight`. A batch leaves when it is full,
// when every member of its tape is there, or when its oldest request waited the window: a
// lone session never waits longer than that.
//
// A worker that dies or whose backend fails is restarted; meanwhile `ready` is false (the
// node's /v1/ready says 503) and requests wait in their queues. A request that was running
// when its worker died without answering is run once more on the fresh worker; the tapes
// the worker held are lost, and their backwards are recomputed from h_B (TapeLost).
import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { startTsWorker } from '../model/index.ts';
import type { Logger } from 'pino';
import { CloudError, resourceErrorOf } from './errors.ts';
import type { BatchItem, BlockRange, HeldLora, Shape3 } from './middle-compute.ts';
import type { WorkerMessage, WorkerRequest, WorkerStart } from './middle-worker.ts';

export type { BlockRange, HeldLora, HeldModule, Shape3 } from './middle-compute.ts';

/** A forward's tape, kept by one worker; what the activation cache holds. */
export interface KeptTape {
  readonly savedBytes: number;
  dispose(): void;
}

/** The tape's worker ended (crash or restart) or the tape was used: recompute from h_B. */
export class TapeLost extends Error {
  override readonly name = 'TapeLost';
}

export interface MiddleExecutorOptions {
  modelDir: string;
  backend?: string;
  /** Run the middle on ONNX Runtime with this engine (tfjs on `backend` when unset). */
  engine?: 'ort-cpu' | 'ort-cuda';
  /** ORT intra-op threads per worker (TANDEM_THREADS, else the machine's cores shared among the workers). */
  threads?: number;
  /** Compute workers (1). */
  workers?: number;
  /** How long the oldest request of a batch may wait for others, ms (0: a batch is what is queued when a worker frees). */
  batchWindowMs?: number;
  /** Tokens (batch x seq) of one batch at most (512); a larger request runs alone. */
  maxBatchTokens?: number;
  /** A tenant's requests taken per round when a batch is filled (1). */
  tenantWeights?: Readonly<Record<string, number>>;
  /** Tokens of one tenant computing at once at most (unbounded); a tenant with nothing running may always run one request. */
  tenantTokensInFlight?: number;
  log?: Logger;
  /** Called whenever a worker fails and is restarted (for metrics). */
  onRestart?: (index: number, reason: string) => void;
  onReady?: (ready: boolean) => void;
  /** Called for each batch handed to a worker (for metrics). */
  onBatch?: (batch: BatchInfo) => void;
}

/** What the scheduler handed a worker. */
export interface BatchInfo {
  kind: JobKind;
  requests: number;
  tokens: number;
  /** Each request's wait in its queue, seconds. */
  waitSeconds: number[];
  /** Tokens per tenant in this batch. */
  tenantTokens: Map<string, number>;
}

export const DEFAULT_BATCH_WINDOW_MS = 0;
export const DEFAULT_MAX_BATCH_TOKENS = 512;

export type JobKind = 'forward' | 'backwardFromTape' | 'backward';

/** What one request asks of the worker; a batch is a list of these, of one kind. */
type Payload =
  | { op: 'forward'; item: BatchItem; keepTape: boolean }
  | { op: 'backwardFromTape'; tape: WorkerTape; g: Float32Array; shape: Shape3 }
  | { op: 'backward'; item: BatchItem };

interface Done {
  output: Float32Array;
  /** A forward's kept tape (as the worker answered). */
  tape?: { tapeId: number; member: number; group: TapeGroup };
  /** This member's share of the tape's bytes. */
  savedBytes: number;
  /** A backward with a held LoRA: the gradients of its factors. */
  loraGrads?: Float32Array[];
  slot: number;
  generation: number;
}

interface Job {
  tenant: string;
  payload: Payload;
  tokens: number;
  queuedAt: number;
  /** Only this worker can run it (a backward from its tape). */
  slot?: number;
  generation?: number;
  attempts: number;
  /** Runs in a batch of its own: its batch failed, and it must not fail again for another's sake. */
  alone?: boolean;
  /** Dropped unrun when still queued at this time (performance.now ms): nobody waits for its answer any more. */
  expiresAt?: number;
  resolve: (done: Done) => void;
  reject: (error: unknown) => void;
}

interface Slot {
  index: number;
  worker?: Worker;
  /** Bumped at every (re)start: tapes of older generations are gone. */
  generation: number;
  loaded: boolean;
  running?: { id: number; jobs: Job[] };
  restarts: number;
}

/** The members of one kept tape; a packed tape serves a single backward for them all. */
interface TapeGroup {
  readonly slot: number;
  readonly generation: number;
  readonly tapeId: number;
  readonly perMember: boolean;
  /** Members whose backward is not yet asked for and that are not dropped. */
  readonly outstanding: Set<number>;
  /** A packed tape's backward ran (or was handed to the worker): later members recompute. */
  consumed: boolean;
}

class WorkerTape implements KeptTape {
  readonly savedBytes: number;
  readonly group: TapeGroup;
  readonly member: number;
  used = false;
  readonly #drop: (tape: WorkerTape) => void;

  constructor(savedBytes: number, group: TapeGroup, member: number, drop: (tape: WorkerTape) => void) {
    this.savedBytes = savedBytes;
    this.group = group;
    this.member = member;
    this.#drop = drop;
  }

  get slot(): number {
    return this.group.slot;
  }

  get generation(): number {
    return this.group.generation;
  }

  dispose(): void {
    if (this.used) return;
    this.used = true;
    this.#drop(this);
  }
}

const RESTART_DELAY_MS = 100;

const tokensOf = (shape: Shape3): number => shape[0] * shape[1];

/** Requests that may share a batch have one key. */
function keyOf(job: Job): string {
  const p = job.payload;
  if (p.op === 'backwardFromTape') return `tape:${p.tape.slot}:${p.tape.generation}:${p.tape.group.tapeId}`;
  // Forwards with held LoRAs batch with each other (no tape kept): the base matmuls once, each LoRA on its rows.
  return p.op === 'forward' && p.item.lora !== undefined ? 'forward:held' : p.op;
}

export class MiddleExecutor {
  readonly #options: MiddleExecutorOptions;
  readonly #slots: Slot[];
  /** Per-tenant FIFO queues; `#order` is the round-robin order of tenants with work. */
  readonly #queues = new Map<string, Job[]>();
  #order: string[] = [];
  /** The batch that last served each tenant: rounds start with the tenant served longest ago. */
  readonly #lastServed = new Map<string, number>();
  /** Tokens computing now, per tenant. */
  readonly #running = new Map<string, number>();
  #nextId = 1;
  #closed = false;
  #backend = '';
  #timer?: NodeJS.Timeout;
  #timerAt = Infinity;
  readonly #window: number;
  readonly #maxTokens: number;

  private constructor(options: MiddleExecutorOptions) {
    this.#options = options;
    this.#slots = Array.from({ length: Math.max(1, options.workers ?? 1) }, (_, index) => ({ index, generation: 0, loaded: false, restarts: 0 }));
    this.#window = options.batchWindowMs ?? DEFAULT_BATCH_WINDOW_MS;
    this.#maxTokens = options.maxBatchTokens ?? DEFAULT_MAX_BATCH_TOKENS;
    const check = (option: string, value: number | undefined, ok: boolean, reason: string): void => {
      if (value !== undefined && !ok) throw new CloudError('TANDEM_OPTION_INVALID', { option, value: String(value), reason });
    };
    check('batchWindowMs', options.batchWindowMs, Number.isFinite(options.batchWindowMs) && (options.batchWindowMs ?? 0) >= 0, 'a number of milliseconds >= 0');
    check('maxBatchTokens', options.maxBatchTokens, Number.isInteger(options.maxBatchTokens) && (options.maxBatchTokens ?? 0) >= 1, 'an integer >= 1');
    check('tenantTokensInFlight', options.tenantTokensInFlight, Number.isInteger(options.tenantTokensInFlight) && (options.tenantTokensInFlight ?? 0) >= 1, 'an integer >= 1');
    for (const [tenant, w] of Object.entries(options.tenantWeights ?? {})) check(`tenantWeights.${tenant}`, w, Number.isInteger(w) && w >= 1 && w <= 1000, 'an integer from 1 to 1000');
  }

  /** Starts the workers and resolves once each has loaded the model. */
  static async start(options: MiddleExecutorOptions): Promise<MiddleExecutor> {
    const executor = new MiddleExecutor(options);
    try {
      await Promise.all(executor.#slots.map((slot) => executor.#spawn(slot)));
    } catch (error) {
      await executor.close();
      throw error;
    }
    return executor;
  }

  /** Every worker is loaded and running. */
  get ready(): boolean {
    return !this.#closed && this.#slots.every((s) => s.loaded);
  }

  get workers(): number {
    return this.#slots.length;
  }

  /** Worker restarts since start, all workers together. */
  get restarts(): number {
    return this.#slots.reduce((n, s) => n + s.restarts, 0);
  }

  /** The compute backend the workers picked. */
  get backend(): string {
    return this.#backend;
  }

  /** Requests waiting for a worker, all tenants together. */
  get queued(): number {
    let n = 0;
    for (const q of this.#queues.values()) n += q.length;
    return n;
  }

  /** Requests computing on a worker now. */
  get running(): number {
    return this.#slots.filter((s) => s.running !== undefined).length;
  }

  /**
   * h_B [batch, seq, hidden] → h_M. `_frames` (MiddleRunner's: the edge's frames, for a cluster to
   * send) is not needed here; `waitMs`, how long the asker waits, drops the request unrun past it.
   */
  async forward(range: BlockRange, h: Float32Array, shape: Shape3, tenant = '', _frames?: unknown, waitMs?: number): Promise<Float32Array> {
    return (await this.#submit(tenant, { op: 'forward', item: { range, h, shape }, keepTape: false }, tokensOf(shape), undefined, waitMs)).output;
  }

  /** h_B → h_M, the worker keeping the forward's tape so that backwardFromTape needs no recomputation. */
  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3, tenant = '', _frames?: unknown, waitMs?: number): Promise<{ output: Float32Array; tape: KeptTape }> {
    const done = await this.#submit(tenant, { op: 'forward', item: { range, h, shape }, keepTape: true }, tokensOf(shape), undefined, waitMs);
    if (done.tape === undefined) throw new TapeLost('the worker kept no tape');
    return { output: done.output, tape: new WorkerTape(done.savedBytes, done.tape.group, done.tape.member, (t) => this.#dropTape(t)) };
  }

  /** g_M → g_B from a kept tape (which this frees); TapeLost when its worker restarted since, or its packed tape served another member's backward. */
  async backwardFromTape(tape: KeptTape, g: Float32Array, shape: Shape3, tenant = ''): Promise<Float32Array> {
    if (!(tape instanceof WorkerTape) || tape.used || tape.group.consumed || this.#slots[tape.slot]?.generation !== tape.generation) throw new TapeLost('the tape is gone');
    tape.used = true;
    tape.group.outstanding.delete(tape.member);
    return (await this.#submit(tenant, { op: 'backwardFromTape', tape, g, shape }, tokensOf(shape), { slot: tape.slot, generation: tape.generation })).output;
  }

  /** g_M (same shape as h_B) → g_B, recomputing the forward from h_B. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant = '', _frames?: unknown, waitMs?: number): Promise<Float32Array> {
    return (await this.#submit(tenant, { op: 'backward', item: { range, h, g, shape } }, tokensOf(shape), undefined, waitMs)).output;
  }

  /** Whether held middle adapters can run here (both computes run them). */
  get holdsAdapters(): boolean {
    return true;
  }

  /** h_B → h_M with the session's held LoRA; no tape is kept (its backward recomputes). */
  async forwardHeld(range: BlockRange, h: Float32Array, shape: Shape3, tenant: string, lora: HeldLora, waitMs?: number): Promise<Float32Array> {
    return (await this.#submit(tenant, { op: 'forward', item: { range, h, shape, lora }, keepTape: false }, tokensOf(shape), undefined, waitMs)).output;
  }

  /** g_M → g_B with the session's held LoRA, recomputing from h_B; also the gradients of its factors (A then B per module). */
  async backwardHeld(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant: string, lora: HeldLora, waitMs?: number): Promise<{ output: Float32Array; loraGrads: Float32Array[] }> {
    const done = await this.#submit(tenant, { op: 'backward', item: { range, h, g, shape, lora } }, tokensOf(shape), undefined, waitMs);
    if (done.loraGrads === undefined) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'the worker returned no gradients for the held adapter' });
    return { output: done.output, loraGrads: done.loraGrads };
  }

  /** Ends a worker as a crash would (operations and tests); it is restarted like any failed worker. */
  async terminateWorker(index: number): Promise<void> {
    const slot = this.#slots[index];
    if (slot?.worker === undefined) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: `no compute worker ${index}; there are ${this.#slots.length}` });
    // Not ready from now on, not from when the exit event comes.
    slot.loaded = false;
    this.#options.onReady?.(false);
    await slot.worker.terminate();
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    for (const queue of this.#queues.values()) for (const job of queue) job.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    this.#queues.clear();
    this.#order = [];
    await Promise.all(this.#slots.map(async (slot) => {
      const worker = slot.worker;
      slot.worker = undefined;
      slot.loaded = false;
      for (const job of slot.running?.jobs ?? []) job.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
      slot.running = undefined;
      if (worker !== undefined) await worker.terminate();
    }));
  }

  /** `waitMs`: how long whoever asked waits for the answer; a job still queued then is dropped unrun. */
  #submit(tenant: string, payload: Payload, tokens: number, affinity?: { slot: number; generation: number }, waitMs?: number): Promise<Done> {
    if (this.#closed) return Promise.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    return new Promise((resolve, reject) => {
      const queuedAt = performance.now();
      const job: Job = { tenant, payload, tokens, queuedAt, slot: affinity?.slot, generation: affinity?.generation, attempts: 0, reject, resolve, ...(waitMs === undefined ? {} : { expiresAt: queuedAt + waitMs }) };
      let queue = this.#queues.get(tenant);
      if (queue === undefined) {
        queue = [];
        this.#queues.set(tenant, queue);
        this.#order.push(tenant);
      }
      queue.push(job);
      this.#dispatch();
    });
  }

  /** Hands each idle worker the next batch that is ready; when one is still filling, comes back at its deadline. */
  #dispatch(): void {
    if (this.#closed) return;
    let next = Infinity;
    for (const slot of this.#slots) {
      if (!slot.loaded || slot.running !== undefined || slot.worker === undefined) continue;
      const choice = this.#form(slot);
      if (choice === undefined) continue;
      if ('deadline' in choice) {
        next = Math.min(next, choice.deadline);
        continue;
      }
      this.#post(slot, choice.jobs);
    }
    if (next < Infinity && next < this.#timerAt) {
      clearTimeout(this.#timer);
      this.#timerAt = next;
      this.#timer = setTimeout(() => {
        this.#timerAt = Infinity;
        this.#dispatch();
      }, Math.max(0, next - performance.now()));
    }
  }

  #post(slot: Slot, jobs: Job[]): void {
    for (const job of jobs) {
      const queue = this.#queues.get(job.tenant) ?? [];
      queue.splice(queue.indexOf(job), 1);
      if (queue.length === 0) {
        this.#queues.delete(job.tenant);
        this.#order = this.#order.filter((t) => t !== job.tenant);
      }
      this.#running.set(job.tenant, (this.#running.get(job.tenant) ?? 0) + job.tokens);
    }
    const id = this.#nextId++;
    // The tenants served go to the back of the round (a tenant new to the queues is at its front).
    for (const job of jobs) this.#lastServed.set(job.tenant, id);
    slot.running = { id, jobs };
    const now = performance.now();
    const tenantTokens = new Map<string, number>();
    for (const j of jobs) tenantTokens.set(j.tenant, (tenantTokens.get(j.tenant) ?? 0) + j.tokens);
    const first = jobs[0].payload;
    this.#options.onBatch?.({ kind: first.op, requests: jobs.length, tokens: jobs.reduce((n, j) => n + j.tokens, 0), waitSeconds: jobs.map((j) => (now - j.queuedAt) / 1000), tenantTokens });
    let request: WorkerRequest;
    if (first.op === 'backwardFromTape') {
      first.tape.group.consumed = !first.tape.group.perMember;
      const payloads = jobs.map((j) => j.payload as Extract<Payload, { op: 'backwardFromTape' }>);
      request = { id, op: 'backwardFromTape', tapeId: first.tape.group.tapeId, members: payloads.map((p) => p.tape.member), gs: payloads.map((p) => p.g), shapes: payloads.map((p) => p.shape) };
    } else if (first.op === 'forward') {
      const payloads = jobs.map((j) => j.payload as Extract<Payload, { op: 'forward' }>);
      request = { id, op: 'forward', items: payloads.map((p) => p.item), keepTape: payloads.some((p) => p.keepTape) };
    } else {
      request = { id, op: 'backward', items: jobs.map((j) => (j.payload as Extract<Payload, { op: 'backward' }>).item) };
    }
    slot.worker?.postMessage(request);
  }

  /** The jobs a worker may take now, or the time at which the batch that fills is due. */
  #form(slot: Slot): { jobs: Job[] } | { deadline: number } | undefined {
    const now = performance.now();
    const cap = this.#options.tenantTokensInFlight ?? Infinity;
    const heads = new Map<string, Job>();
    const order = [...this.#order].sort((a, b) => (this.#lastServed.get(a) ?? 0) - (this.#lastServed.get(b) ?? 0));
    // Each key's candidate head, tenants in round-robin order.
    for (const tenant of order) {
      for (const job of this.#queues.get(tenant) ?? []) {
        if (job.expiresAt !== undefined && now > job.expiresAt) {
          this.#drop(job);
          job.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `it was still queued ${Math.round(now - job.queuedAt)} ms after it came, when its sender had stopped waiting: not computed` }));
          return this.#form(slot);
        }
        if (job.slot !== undefined && job.slot !== slot.index) continue;
        if (job.slot !== undefined && job.generation !== slot.generation) {
          this.#drop(job);
          job.reject(new TapeLost('the worker that kept the tape restarted'));
          return this.#form(slot);
        }
        const key = keyOf(job);
        if (!heads.has(key)) heads.set(key, job);
      }
    }
    let deadline = Infinity;
    for (const [key, head] of heads) {
      const jobs: Job[] = [];
      const taken = new Map<string, number>();
      let tokens = 0;
      let full = false;
      // Weighted rounds over the tenants, starting with the head's.
      const at = order.indexOf(head.tenant);
      const tenants = order.slice(at).concat(order.slice(0, at));
      const pending = new Map(tenants.map((t) => [t, (this.#queues.get(t) ?? []).filter((j) => keyOf(j) === key && (j.slot === undefined || j.slot === slot.index))]));
      for (let progress = true; progress && !full;) {
        progress = false;
        for (const tenant of tenants) {
          const list = pending.get(tenant) ?? [];
          const weight = this.#options.tenantWeights?.[tenant] ?? 1;
          for (let w = 0; w < weight && list.length > 0; w++) {
            const job = list[0];
            const inFlight = (this.#running.get(tenant) ?? 0) + (taken.get(tenant) ?? 0);
            if (inFlight + job.tokens > cap && inFlight > 0) break;
            if (jobs.length > 0 && (tokens + job.tokens > this.#maxTokens || job.alone === true || jobs[0].alone === true)) {
              full = true;
              break;
            }
            list.shift();
            jobs.push(job);
            tokens += job.tokens;
            taken.set(tenant, (taken.get(tenant) ?? 0) + job.tokens);
            progress = true;
            if (job.alone === true) {
              full = true;
              break;
            }
          }
          if (full) break;
        }
      }
      if (jobs.length === 0) continue;
      const oldest = Math.min(...jobs.map((j) => j.queuedAt));
      const first = jobs[0].payload;
      const complete = first.op === 'backwardFromTape' && first.tape.group.outstanding.size === 0;
      if (full || complete || tokens >= this.#maxTokens || now - oldest >= this.#window) return { jobs };
      deadline = Math.min(deadline, oldest + this.#window);
    }
    return deadline < Infinity ? { deadline } : undefined;
  }

  /** Takes a job out of its queue without running it. */
  #drop(job: Job): void {
    const queue = this.#queues.get(job.tenant);
    if (queue === undefined) return;
    queue.splice(queue.indexOf(job), 1);
    if (queue.length === 0) {
      this.#queues.delete(job.tenant);
      this.#order = this.#order.filter((t) => t !== job.tenant);
    }
  }

  #dropTape(tape: WorkerTape): void {
    tape.group.outstanding.delete(tape.member);
    const slot = this.#slots[tape.slot];
    if (slot?.worker !== undefined && slot.generation === tape.generation) {
      slot.worker.postMessage({ id: 0, op: 'dropTape', tapeId: tape.group.tapeId, member: tape.member } satisfies WorkerRequest);
    }
    // A backward waiting for this member may now go.
    this.#dispatch();
  }

  #threads(): number | undefined {
    if (this.#options.engine === undefined) return undefined;
    if (this.#options.threads !== undefined) return this.#options.threads;
    if (process.env.TANDEM_THREADS !== undefined && process.env.TANDEM_THREADS !== '') return undefined;
    return Math.max(1, Math.floor(availableParallelism() / this.#slots.length));
  }

  /** The jobs' tokens no longer run. */
  #finish(jobs: Job[]): void {
    for (const job of jobs) {
      const left = (this.#running.get(job.tenant) ?? 0) - job.tokens;
      if (left > 0) this.#running.set(job.tenant, left);
      else this.#running.delete(job.tenant);
    }
  }

  #resolve(slot: Slot, jobs: Job[], reply: Extract<WorkerMessage, { type: 'result' }>): void {
    const group: TapeGroup | undefined = reply.tapeId === undefined ? undefined : {
      slot: slot.index, generation: slot.generation, tapeId: reply.tapeId, perMember: reply.perMember ?? true,
      outstanding: new Set(jobs.map((_, k) => k)), consumed: false,
    };
    const share = jobs.length > 0 ? Math.ceil((reply.savedBytes ?? 0) / jobs.length) : 0;
    jobs.forEach((job, member) => {
      const output = reply.outputs[member];
      const keeps = job.payload.op === 'forward' && job.payload.keepTape;
      if (group !== undefined && !keeps) {
        // A member that wanted no tape lets its part go at once.
        group.outstanding.delete(member);
        slot.worker?.postMessage({ id: 0, op: 'dropTape', tapeId: group.tapeId, member } satisfies WorkerRequest);
      }
      job.resolve({
        output, tape: group !== undefined && keeps ? { tapeId: group.tapeId, member, group } : undefined, slot: slot.index, generation: slot.generation, savedBytes: share,
        ...(reply.loraGrads?.[member] !== undefined ? { loraGrads: reply.loraGrads[member] } : {}),
      });
    });
  }

  #spawn(slot: Slot): Promise<void> {
    slot.generation++;
    slot.loaded = false;
    const start: WorkerStart = { modelDir: this.#options.modelDir, backend: this.#options.backend, engine: this.#options.engine, threads: this.#threads() };
    const worker = startTsWorker(new URL('./middle-worker.ts', import.meta.url), start);
    slot.worker = worker;
    return new Promise((resolve, reject) => {
      let started = false;
      worker.on('message', (message: WorkerMessage) => {
        if (slot.worker !== worker) return;
        if (message.type === 'ready') {
          started = true;
          slot.loaded = true;
          this.#backend = message.backend;
          this.#options.onReady?.(this.ready);
          resolve();
          this.#dispatch();
          return;
        }
        const running = slot.running;
        if (running === undefined || running.id !== message.id) return;
        slot.running = undefined;
        this.#finish(running.jobs);
        if (message.type === 'result') this.#resolve(slot, running.jobs, message);
        else {
          const error = new Error(message.message);
          error.name = message.name;
          const batched = running.jobs.length > 1;
          for (const job of [...running.jobs].reverse()) {
            if (!message.fatal) job.reject(new TapeLost(message.message));
            // One session's poison micro-batch must not fail the others batched with it: each runs
            // once more alone (a backward from a tape recomputes, the tape's worker is ending).
            else if (batched && job.slot === undefined && job.alone !== true) {
              job.alone = true;
              this.#requeue(job);
            } else if (batched && job.slot !== undefined) job.reject(new TapeLost('the worker that kept the tape failed on another request of its batch'));
            else job.reject(resourceErrorOf(error, 'memory') ?? new CloudError('TANDEM_COMPUTE_FAILED', { reason: message.message.slice(0, 200) }, { cause: error }));
          }
        }
        this.#dispatch();
      });
      worker.on('error', (error) => {
        this.#options.log?.error({ err: error, worker: slot.index }, 'compute worker failed');
        if (!started) reject(error);
      });
      worker.on('exit', (code) => {
        if (slot.worker !== worker) return;
        slot.worker = undefined;
        slot.loaded = false;
        if (!started) {
          reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `the compute worker exited with code ${code} while loading the model` }));
          return;
        }
        if (this.#closed) return;
        this.#options.onReady?.(false);
        const running = slot.running;
        slot.running = undefined;
        if (running !== undefined) {
          this.#finish(running.jobs);
          // Its worker died without answering: run each once more, unless it already killed one.
          for (const job of [...running.jobs].reverse()) {
            job.attempts++;
            if (job.slot !== undefined) job.reject(new TapeLost('the worker that kept the tape ended'));
            else if (job.attempts > 1) job.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'the compute worker ended twice while running this request' }));
            else this.#requeue(job);
          }
        }
        slot.restarts++;
        const reason = `exit code ${code}`;
        this.#options.log?.warn({ worker: slot.index, reason }, 'compute worker ended; restarting it');
        this.#options.onRestart?.(slot.index, reason);
        setTimeout(() => {
          if (this.#closed) return;
          this.#spawn(slot).catch((error: unknown) => this.#options.log?.error({ err: error, worker: slot.index }, 'compute worker could not restart'));
        }, RESTART_DELAY_MS * Math.min(50, slot.restarts)).unref();
      });
    });
  }

  #requeue(job: Job): void {
    let queue = this.#queues.get(job.tenant);
    if (queue === undefined) {
      queue = [];
      this.#queues.set(job.tenant, queue);
      this.#order.unshift(job.tenant);
    }
    queue.unshift(job);
    // A request its worker's death interrupted runs before anything else.
    this.#lastServed.set(job.tenant, -this.#nextId);
  }
}
