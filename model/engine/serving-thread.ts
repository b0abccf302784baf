// OrtServingEngine in a worker thread (serving-worker.ts): ONNX Runtime's session.run is
// synchronous, so on the node's own thread every step would stop HTTP (new requests could
// only arrive, parse and queue between steps). Here a step is a message: the rows' sequence
// ids and new tokens go out, each row's logits come back. An adapter's stacked factors are
// sent once, while some open sequence uses them, and dropped with its last one.
import type { Worker } from 'node:worker_threads';
import { startTsWorker } from '../worker-thread.ts';
import type { ModelConfig } from '../config.ts';
import { MODEL_ERRORS, ModelError } from '../errors.ts';
import type { ModelErrorCode } from '../errors.ts';
import type { WeightArrays } from './llama-graphs.ts';
import type { OrtProvider } from './ort-llama.ts';
import type { ServingLora, ServingTimings } from './serving-engine.ts';
import type { ServingWorkerMessage, ServingWorkerReply, ServingWorkerStart } from './serving-worker.ts';

/** A sequence held in the worker; `length` counts the positions run so far. */
export class ThreadSequence {
  length = 0;
  freed = false;
  constructor(
    readonly id: number,
    readonly capacity: number,
    readonly lora: ServingLora | undefined,
  ) {}
}


export class ServingThread {
  readonly config: ModelConfig;
  timings: ServingTimings = { runs: 0, packMs: 0, graphMs: 0, unpackMs: 0 };
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (l: Float32Array[]) => void; reject: (e: unknown) => void }>();
  readonly #loraIds = new Map<ServingLora, { id: number; users: number }>();
  #next = 1;
  #dead: Error | undefined;

  private constructor(config: ModelConfig, worker: Worker) {
    this.config = config;
    this.#worker = worker;
    worker.on('message', (m: ServingWorkerReply) => {
      if (m.op !== 'stepped' && m.op !== 'failed') return;
      const p = this.#pending.get(m.req);
      this.#pending.delete(m.req);
      // An idle worker does not keep the process alive.
      if (this.#pending.size === 0) worker.unref();
      if (m.op === 'stepped') {
        this.timings = m.timings;
        p?.resolve(m.logits);
      } else {
        const code = (m.code !== undefined && m.code in MODEL_ERRORS ? m.code : 'TANDEM_BACKEND_UNAVAILABLE') as ModelErrorCode;
        p?.reject(new ModelError(code, m.message));
      }
    });
    const die = (err: Error): void => {
      this.#dead ??= err;
      for (const p of this.#pending.values()) p.reject(new ModelError('TANDEM_BACKEND_UNAVAILABLE', `the serving worker stopped: ${err.message}`));
      this.#pending.clear();
    };
    worker.on('error', die);
    worker.on('exit', (code) => die(new Error(`exit code ${code}`)));
  }

  /** Starts the worker and its engine over a copy of these weights. */
  static async create(config: ModelConfig, weights: WeightArrays, options: { threads?: number; provider?: OrtProvider } = {}): Promise<ServingThread> {
    const start: ServingWorkerStart = { config, weights: [...weights].map(([name, w]) => [name, w.shape, w.data]), threads: options.threads, provider: options.provider };
    const worker = startTsWorker(new URL('./serving-worker.ts', import.meta.url), start);
    await new Promise<void>((resolve, reject) => {
      const onMessage = (m: ServingWorkerReply): void => {
        if (m.op === 'ready') resolve();
        else if (m.op === 'init-failed') reject(new ModelError('TANDEM_BACKEND_UNAVAILABLE', `the serving engine could not start: ${m.message}`, { field: 'engine' }));
        else return;
        worker.off('message', onMessage);
      };
      worker.on('message', onMessage);
      worker.once('error', (err) => reject(new ModelError('TANDEM_BACKEND_UNAVAILABLE', `the serving worker failed: ${err.message}`, { field: 'engine', cause: err })));
    }).catch(async (err: unknown) => {
      await worker.terminate();
      throw err;
    });
    worker.unref();
    return new ServingThread(config, worker);
  }

  #post(m: ServingWorkerMessage, transfer: ArrayBuffer[] = []): void {
    this.#worker.postMessage(m, transfer);
  }

  sequence(capacity: number, lora?: ServingLora): ThreadSequence {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > this.config.maxPositionEmbeddings) {
      throw new ModelError('TANDEM_INPUT_INVALID', `capacity must be an integer in [1, ${this.config.maxPositionEmbeddings}], got ${capacity}`, { field: 'capacity' });
    }
    let loraId: number | undefined;
    if (lora !== undefined) {
      let held = this.#loraIds.get(lora);
      if (held === undefined) {
        held = { id: this.#next++, users: 0 };
        this.#loraIds.set(lora, held);
        this.#post({ op: 'lora', id: held.id, spec: lora.spec, factors: [...lora.factors].map(([path, f]) => [path, f.a, f.b]) });
      }
      held.users += 1;
      loraId = held.id;
    }
    const s = new ThreadSequence(this.#next++, capacity, lora);
    this.#post({ op: 'open', seq: s.id, capacity, lora: loraId });
    return s;
  }

  free(s: ThreadSequence): void {
    if (s.freed) return;
    s.freed = true;
    this.#post({ op: 'free', seq: s.id });
    if (s.lora === undefined) return;
    const held = this.#loraIds.get(s.lora);
    if (held !== undefined && --held.users === 0) {
      this.#loraIds.delete(s.lora);
      this.#post({ op: 'drop-lora', id: held.id });
    }
  }

  /** As OrtServingEngine.step, in the worker. */
  async step(rows: readonly { ids: readonly number[]; sequence: ThreadSequence }[]): Promise<Float32Array[]> {
    if (this.#dead) throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `the serving worker stopped: ${this.#dead.message}`);
    for (const { ids, sequence } of rows) {
      if (sequence.freed) throw new ModelError('TANDEM_INPUT_INVALID', 'a row\'s sequence was freed', { field: 'sequence' });
      if (ids.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'a row of a batched step has no tokens', { field: 'input_ids' });
      if (sequence.length + ids.length > sequence.capacity) {
        throw new ModelError('TANDEM_INPUT_INVALID', `a row reaches position ${sequence.length + ids.length}, over its capacity ${sequence.capacity}`, { field: 'input_ids' });
      }
    }
    const req = this.#next++;
    const logits = await new Promise<Float32Array[]>((resolve, reject) => {
      this.#pending.set(req, { resolve, reject });
      this.#worker.ref();
      this.#post({ op: 'step', req, rows: rows.map((r) => ({ seq: r.sequence.id, ids: [...r.ids] })) });
    });
    for (const { ids, sequence } of rows) sequence.length += ids.length;
    return logits;
  }

  async dispose(): Promise<void> {
    await this.#worker.terminate();
  }
}
