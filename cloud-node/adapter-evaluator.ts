// POST /v1/models/:id/adapters/evaluate off the node's event loop: the evaluation (tokenizing
// the data, the model run twice over it) computes in a worker thread of its own
// (adapter-evaluation-worker.ts), started at the first evaluation with its own copy of the
// served model, and stopped after a while idle to free that copy. What costs only the files'
// headers is checked here first (checkAdapterFiles), so a refused adapter waits for nothing.
// Evaluations run one at a time in arrival order; a bounded number wait (more are 503
// TANDEM_EVAL_BUSY), each is bounded in tokens (counted in the worker after tokenizing, before
// any compute) and in time (past it the worker is stopped, and the next evaluation starts a
// fresh one). A worker that crashes fails its evaluation with TANDEM_COMPUTE_FAILED; nothing
// else on the node notices.
import type { Worker } from 'node:worker_threads';
import { startTsWorker } from '../model/index.ts';
import type { AdapterEvaluation } from '../protocol/index.ts';
import { checkAdapterFiles } from './adapter-evaluation.ts';
import type { AdapterFiles, EvaluationData } from './adapter-evaluation.ts';
import type { EvaluationWorkerReply, EvaluationWorkerRequest, EvaluationWorkerStart } from './adapter-evaluation-worker.ts';
import { CloudError } from './errors.ts';
import type { ServedModel } from './served-model.ts';

export interface AdapterEvaluationLimits {
  /** Evaluations that may wait behind the one computing, all tenants together (4); more are 503 TANDEM_EVAL_BUSY. */
  maxWaiting: number;
  /** Tokens one evaluation may run through the model, plug-in and baseline together (262,144). */
  maxTokens: number;
  /** Longest one evaluation may compute (300 s); past it the worker is stopped. */
  timeoutMs: number;
  /** A worker idle this long is stopped, freeing its copy of the model (60 s). */
  idleMs: number;
  /**
   * Largest served model (its weights' bytes in float32) the worker loads a copy of (4 GiB):
   * the node holds the model twice while an evaluation runs, so over this it refuses them.
   */
  maxModelBytes: number;
}

export const DEFAULT_ADAPTER_EVALUATION_LIMITS: Readonly<AdapterEvaluationLimits> = { maxWaiting: 4, maxTokens: 262_144, timeoutMs: 300_000, idleMs: 60_000, maxModelBytes: 4 * 1024 ** 3 };

const modelBytes = new WeakMap<ServedModel, number>();

/** The served model's weights in float32 bytes, as a worker's copy of them takes. */
function bytesOf(served: ServedModel): number {
  let bytes = modelBytes.get(served);
  if (bytes === undefined) {
    bytes = 0;
    for (const t of served.model.weights.values()) bytes += t.size * 4;
    modelBytes.set(served, bytes);
  }
  return bytes;
}

/** What an operator counts (metrics, tests). */
export interface AdapterEvaluatorEvents {
  /** The worker stopped other than by going idle or the node closing: a crash, a timeout, a failed backend. */
  onWorkerStopped?: (reason: string) => void;
}

interface Job {
  served: ServedModel;
  files: AdapterFiles;
  data: EvaluationData;
  options: { seqLen: number; batchSize: number };
  resolve: (result: AdapterEvaluation) => void;
  reject: (error: unknown) => void;
}

/** One worker thread, computing at most one evaluation. */
class EvaluationThread {
  readonly served: ServedModel;
  readonly #worker: Worker;
  readonly ready: Promise<void>;
  #current: { req: number; resolve: (r: AdapterEvaluation) => void; reject: (e: unknown) => void } | undefined;
  #next = 1;
  dead: Error | undefined;
  readonly #die: (error: Error) => void;

  constructor(served: ServedModel, start: EvaluationWorkerStart, onDeath: (thread: EvaluationThread, error: Error) => void) {
    this.served = served;
    this.#worker = startTsWorker(new URL('./adapter-evaluation-worker.ts', import.meta.url), start);
    let started: (() => void) | undefined;
    let failed: ((e: Error) => void) | undefined;
    this.ready = new Promise<void>((resolve, reject) => {
      started = resolve;
      failed = reject;
    });
    this.ready.catch(() => undefined);
    this.#worker.on('message', (m: EvaluationWorkerReply) => {
      if (m.op === 'ready') {
        started?.();
        this.#worker.unref();
        return;
      }
      const current = this.#current;
      if (current === undefined || current.req !== m.req) return;
      this.#current = undefined;
      this.#worker.unref();
      if (m.op === 'evaluated') current.resolve(m.result);
      else if (m.code !== undefined) current.reject(new CloudError(m.code, m.details));
      else {
        // An untyped failure is the backend's: this worker ends, the next evaluation gets a fresh one.
        current.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `adapter evaluation: ${m.message}` }));
        void this.terminate(`its backend failed: ${m.message}`);
      }
    });
    this.#die = (error: Error): void => {
      if (this.dead !== undefined) return;
      this.dead = error;
      failed?.(error);
      this.#current?.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `adapter evaluation: the worker stopped (${error.message})` }));
      this.#current = undefined;
      onDeath(this, error);
    };
    this.#worker.on('error', this.#die);
    this.#worker.on('exit', (code) => this.#die(new Error(`exit code ${code}`)));
  }

  /** Computes `job` here; past `timeoutMs` from its start (the worker ready) it fails and the worker ends. */
  async evaluate(job: Job, limits: { maxTokens: number; timeoutMs: number }): Promise<AdapterEvaluation> {
    await this.ready.catch(() => undefined);
    if (this.dead !== undefined) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `adapter evaluation: the worker did not start (${this.dead.message})` });
    const req = this.#next++;
    this.#worker.ref();
    // A copy of the weights travels (transferred, not cloned again); the caller's stay whole.
    const weights = job.files.weights.slice();
    let timer: NodeJS.Timeout | undefined;
    try {
      return await new Promise<AdapterEvaluation>((resolve, reject) => {
        this.#current = { req, resolve, reject };
        const request: EvaluationWorkerRequest = { op: 'evaluate', req, files: { config: job.files.config, weights }, data: { name: job.data.name, text: job.data.text }, options: { ...job.options, maxTokens: limits.maxTokens } };
        this.#worker.postMessage(request, [weights.buffer]);
        timer = setTimeout(() => {
          this.#current = undefined;
          reject(new CloudError('TANDEM_RESOURCE_EXHAUSTED', { resource: 'time', reason: `the evaluation computed for more than ${limits.timeoutMs} ms and was stopped; send less data` }));
          void this.terminate(`an evaluation ran past ${limits.timeoutMs} ms`);
        }, limits.timeoutMs);
      });
    } finally {
      clearTimeout(timer);
    }
  }

  /** Ends the worker; its evaluation, if any, fails with `reason`. */
  async terminate(reason: string): Promise<void> {
    const stopping = this.#worker.terminate();
    this.#die(new Error(reason));
    await stopping;
  }
}

export class AdapterEvaluator {
  readonly #limits: AdapterEvaluationLimits;
  readonly #events: AdapterEvaluatorEvents;
  readonly #queue: Job[] = [];
  #running = false;
  #backends: string[] = ['cpu'];
  #thread: EvaluationThread | undefined;
  #idle: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(limits: Partial<AdapterEvaluationLimits> = {}, events: AdapterEvaluatorEvents = {}) {
    this.#limits = { ...DEFAULT_ADAPTER_EVALUATION_LIMITS, ...limits };
    this.#events = events;
  }

  get limits(): Readonly<AdapterEvaluationLimits> {
    return this.#limits;
  }

  /** The tfjs backends the worker tries in turn (the node's thread's first). */
  useCompute(compute: { backends: readonly string[] }): void {
    if (compute.backends.length > 0) this.#backends = [...compute.backends];
  }

  /** Evaluations computing or waiting. */
  get pending(): number {
    return this.#queue.length + (this.#running ? 1 : 0);
  }

  /** Whether a worker thread holds a copy of the model now. */
  get started(): boolean {
    return this.#thread !== undefined && this.#thread.dead === undefined;
  }

  /**
   * Plugs the adapter into `served` and evaluates it on `data`, in the worker. The files'
   * headers are checked on this thread first; then the evaluation waits its turn.
   */
  evaluate(served: ServedModel, files: AdapterFiles, data: EvaluationData, options: { seqLen: number; batchSize: number }): Promise<AdapterEvaluation> {
    if (this.#closed) return Promise.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    const bytes = bytesOf(served);
    if (bytes > this.#limits.maxModelBytes) {
      return Promise.reject(new CloudError('TANDEM_FEATURE_UNSUPPORTED', { feature: `adapter evaluation on a model of ${bytes} bytes (its worker loads a copy of the model; adapterEvaluation.maxModelBytes is ${this.#limits.maxModelBytes})` }));
    }
    try {
      checkAdapterFiles(served, files);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.#queue.length >= this.#limits.maxWaiting && this.#running) {
      return Promise.reject(new CloudError('TANDEM_EVAL_BUSY', { waiting: this.#queue.length, limit: this.#limits.maxWaiting }));
    }
    return new Promise((resolve, reject) => {
      this.#queue.push({ served, files, data, options, resolve, reject });
      this.#pump();
    });
  }

  #pump(): void {
    if (this.#running || this.#closed) return;
    const job = this.#queue.shift();
    if (job === undefined) {
      this.#scheduleIdleStop();
      return;
    }
    clearTimeout(this.#idle);
    this.#running = true;
    const thread = this.#threadFor(job.served);
    thread.evaluate(job, this.#limits).then(job.resolve, job.reject).finally(() => {
      this.#running = false;
      this.#pump();
    });
  }

  #threadFor(served: ServedModel): EvaluationThread {
    const thread = this.#thread;
    if (thread !== undefined && thread.dead === undefined && thread.served === served) return thread;
    if (thread !== undefined && thread.dead === undefined) void thread.terminate('the node serves another model');
    this.#thread = new EvaluationThread(served, { modelDir: served.dir, modelId: served.id, backends: this.#backends }, (dead, error) => {
      if (this.#thread === dead) this.#thread = undefined;
      if (!this.#closed && !error.message.startsWith('idle')) this.#events.onWorkerStopped?.(error.message);
    });
    return this.#thread;
  }

  #scheduleIdleStop(): void {
    clearTimeout(this.#idle);
    const thread = this.#thread;
    if (thread === undefined || thread.dead !== undefined) return;
    this.#idle = setTimeout(() => {
      if (!this.#running && this.#thread === thread) void thread.terminate(`idle for ${this.#limits.idleMs} ms`);
    }, this.#limits.idleMs);
    this.#idle.unref();
  }

  /** Refuses what waits, fails what computes, and stops the worker. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#idle);
    for (const job of this.#queue.splice(0)) job.reject(new CloudError('TANDEM_MODEL_NOT_READY'));
    const thread = this.#thread;
    this.#thread = undefined;
    await thread?.terminate('the node is closing');
  }
}
