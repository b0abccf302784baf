// The middle executor: a pool of compute workers (middle-worker.ts, one thread each, each
// with the served model loaded once and the tapes of its forwards), fed from per-tenant
// queues served round-robin, so that one tenant's many or large requests do not hold back
// another's, and the event loop (REST, heartbeats, validation) never computes.
//
// A worker that dies or whose backend fails is restarted; meanwhile `ready` is false (the
// node's /v1/ready says 503) and requests wait in their queues. A request that was running
// when its worker died without answering is run once more on the fresh worker; the tapes
// the worker held are lost, and their backwards are recomputed from h_B (TapeLost).
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import { CloudError, resourceErrorOf } from './errors.ts';
import type { BlockRange, Shape3 } from './middle-compute.ts';
import type { WorkerMessage, WorkerRequest, WorkerStart } from './middle-worker.ts';

export type { BlockRange, Shape3 } from './middle-compute.ts';

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
  log?: Logger;
  /** Called whenever a worker fails and is restarted (for metrics). */
  onRestart?: (index: number, reason: string) => void;
  onReady?: (ready: boolean) => void;
}

type JobRequest = Exclude<WorkerRequest, { op: 'dropTape' }>;
type Payload = JobRequest extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never;

interface Done {
  reply: Extract<WorkerMessage, { type: 'result' }>;
  slot: number;
  generation: number;
}

interface Job {
  tenant: string;
  payload: Payload;
  /** Only this worker can run it (a backward from its tape). */
  slot?: number;
  generation?: number;
  attempts: number;
  resolve: (done: Done) => void;
  reject: (error: unknown) => void;
}

interface Slot {
  index: number;
  worker?: Worker;
  /** Bumped at every (re)start: tapes of older generations are gone. */
  generation: number;
  loaded: boolean;
  running?: { id: number; job: Job };
  restarts: number;
}

class WorkerTape implements KeptTape {
  readonly savedBytes: number;
  readonly slot: number;
  readonly generation: number;
  readonly tapeId: number;
  used = false;
  readonly #drop: (tape: WorkerTape) => void;

  constructor(savedBytes: number, slot: number, generation: number, tapeId: number, drop: (tape: WorkerTape) => void) {
    this.savedBytes = savedBytes;
    this.slot = slot;
    this.generation = generation;
    this.tapeId = tapeId;
    this.#drop = drop;
  }

  dispose(): void {
    if (this.used) return;
    this.used = true;
    this.#drop(this);
  }
}

const RESTART_DELAY_MS = 100;
/** The worker bootstrap: tsx's loader, then the TypeScript entry (a worker does not inherit --import hooks). */
function bootstrap(): string {
  const api = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./middle-worker.ts', import.meta.url).href;
  return `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
}

export class MiddleExecutor {
  readonly #options: MiddleExecutorOptions;
  readonly #slots: Slot[];
  /** Per-tenant FIFO queues; `#order` is the round-robin order of tenants with work. */
  readonly #queues = new Map<string, Job[]>();
  #order: string[] = [];
  #nextId = 1;
  #closed = false;
  #backend = '';

  private constructor(options: MiddleExecutorOptions) {
    this.#options = options;
    this.#slots = Array.from({ length: Math.max(1, options.workers ?? 1) }, (_, index) => ({ index, generation: 0, loaded: false, restarts: 0 }));
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

  /** h_B [batch, seq, hidden] → h_M. */
  async forward(range: BlockRange, h: Float32Array, shape: Shape3, tenant = ''): Promise<Float32Array> {
    return (await this.#submit(tenant, { op: 'forward', range, h, shape, keepTape: false })).reply.output;
  }

  /** h_B → h_M, the worker keeping the forward's tape so that backwardFromTape needs no recomputation. */
  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3, tenant = ''): Promise<{ output: Float32Array; tape: KeptTape }> {
    const { reply, slot, generation } = await this.#submit(tenant, { op: 'forward', range, h, shape, keepTape: true });
    const tape = new WorkerTape(reply.savedBytes ?? 0, slot, generation, reply.tapeId ?? 0, (t) => this.#dropTape(t));
    return { output: reply.output, tape };
  }

  /** g_M → g_B from a kept tape (which this frees); TapeLost when its worker restarted since. */
  async backwardFromTape(tape: KeptTape, g: Float32Array, shape: Shape3, tenant = ''): Promise<Float32Array> {
    if (!(tape instanceof WorkerTape) || tape.used || this.#slots[tape.slot]?.generation !== tape.generation) throw new TapeLost('the tape is gone');
    tape.used = true;
    return (await this.#submit(tenant, { op: 'backwardFromTape', tapeId: tape.tapeId, g, shape }, { slot: tape.slot, generation: tape.generation })).reply.output;
  }

  /** g_M (same shape as h_B) → g_B, recomputing the forward from h_B. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant = ''): Promise<Float32Array> {
    return (await this.#submit(tenant, { op: 'backward', range, h, g, shape })).reply.output;
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
    for (const queue of this.#queues.values()) for (const job of queue) job.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    this.#queues.clear();
    this.#order = [];
    await Promise.all(this.#slots.map(async (slot) => {
      const worker = slot.worker;
      slot.worker = undefined;
      slot.loaded = false;
      slot.running?.job.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
      slot.running = undefined;
      if (worker !== undefined) await worker.terminate();
    }));
  }

  #submit(tenant: string, payload: Payload, affinity?: { slot: number; generation: number }): Promise<Done> {
    if (this.#closed) return Promise.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    return new Promise((resolve, reject) => {
      const job: Job = { tenant, payload, slot: affinity?.slot, generation: affinity?.generation, attempts: 0, reject, resolve };
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

  /** Hands each idle worker the next job, tenants taken in turn. */
  #dispatch(): void {
    for (const slot of this.#slots) {
      if (!slot.loaded || slot.running !== undefined || slot.worker === undefined) continue;
      const job = this.#take(slot);
      if (job === undefined) continue;
      const id = this.#nextId++;
      slot.running = { id, job };
      const request = { ...job.payload, id } as JobRequest;
      slot.worker.postMessage(request);
    }
  }

  #take(slot: Slot): Job | undefined {
    for (let turn = 0; turn < this.#order.length; turn++) {
      const tenant = this.#order[turn];
      const queue = this.#queues.get(tenant) ?? [];
      const at = queue.findIndex((job) => job.slot === undefined || job.slot === slot.index);
      if (at < 0) continue;
      const [job] = queue.splice(at, 1);
      // This tenant goes to the back of the round.
      this.#order.splice(turn, 1);
      if (queue.length > 0) this.#order.push(tenant);
      else this.#queues.delete(tenant);
      if (job.slot !== undefined && job.generation !== slot.generation) {
        job.reject(new TapeLost('the worker that kept the tape restarted'));
        return this.#take(slot);
      }
      return job;
    }
    return undefined;
  }

  #dropTape(tape: WorkerTape): void {
    const slot = this.#slots[tape.slot];
    if (slot?.worker === undefined || slot.generation !== tape.generation) return;
    slot.worker.postMessage({ id: 0, op: 'dropTape', tapeId: tape.tapeId } satisfies WorkerRequest);
  }

  #threads(): number | undefined {
    if (this.#options.engine === undefined) return undefined;
    if (this.#options.threads !== undefined) return this.#options.threads;
    if (process.env.TANDEM_THREADS !== undefined && process.env.TANDEM_THREADS !== '') return undefined;
    return Math.max(1, Math.floor(availableParallelism() / this.#slots.length));
  }

  #spawn(slot: Slot): Promise<void> {
    slot.generation++;
    slot.loaded = false;
    const start: WorkerStart = { modelDir: this.#options.modelDir, backend: this.#options.backend, engine: this.#options.engine, threads: this.#threads() };
    const worker = new Worker(bootstrap(), { eval: true, execArgv: [], workerData: start });
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
        if (message.type === 'result') running.job.resolve({ reply: message, slot: slot.index, generation: slot.generation });
        else {
          const error = new Error(message.message);
          error.name = message.name;
          if (!message.fatal) running.job.reject(new TapeLost(message.message));
          else running.job.reject(resourceErrorOf(error, 'memory') ?? new CloudError('TANDEM_COMPUTE_FAILED', { reason: message.message.slice(0, 200) }, { cause: error }));
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
          // Its worker died without answering: run it once more, unless it already killed one.
          running.job.attempts++;
          if (running.job.slot !== undefined) running.job.reject(new TapeLost('the worker that kept the tape ended'));
          else if (running.job.attempts > 1) running.job.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'the compute worker ended twice while running this request' }));
          else this.#requeue(running.job);
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
  }
}
