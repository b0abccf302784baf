// The cloud's half of split inference: per session, the middle blocks' KV cache of one
// sequence. Each InferStep runs the middle on the new tokens' h_B at the next position and
// returns their h_M; what the cache holds is counted against per-session, per-tenant and
// node-wide budgets before it grows, and an InferEnd, a SessionClose or the session's expiry
// frees it. The compute and the caches are in a worker thread (split-inference-worker.ts, on
// ONNX Runtime when the node's middle runs on it, else tfjs), started at the first InferStep:
// a long prompt's middle is seconds of compute that would otherwise stop the node's event
// loop. The steps of one session run one at a time, in arrival order.
// The last step's h_B and h_M are kept: the edge's connection resends a request whose reply it
// did not get, and that resend is answered with the same h_M, not run again (which would
// append its keys and values to the cache a second time).
import type { Worker } from 'node:worker_threads';
import { kvBytesPerToken, startTsWorker } from '../../model/index.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { CloudError } from '../errors.ts';
import type { ServedModel } from '../served-model.ts';
import type { InferenceWorkerReply, InferenceWorkerRequest, InferenceWorkerStart } from './split-inference-worker.ts';

export interface SplitInferenceLimits {
  /** Bytes of middle KV cache one session may hold (32 MiB). */
  perSessionBytes: number;
  /** Bytes one tenant's sessions may hold together (64 MiB): one tenant cannot take the node's budget. */
  perTenantBytes: number;
  /** Bytes all sessions may hold together (256 MiB). */
  totalBytes: number;
}

/** What an operator counts (metrics). */
export interface SplitInferenceEvents {
  /** The caches' bytes, all sessions together, after each change. */
  onBytes?: (bytes: number) => void;
  /** A step answered: computed on the middle, or replayed (a resend of the last step). */
  onStep?: (outcome: 'computed' | 'replayed') => void;
  /** The worker thread stopped (crash, or terminated); not on close. */
  onWorkerStopped?: () => void;
}

export const DEFAULT_SPLIT_INFERENCE_LIMITS: Readonly<SplitInferenceLimits> = { perSessionBytes: 32 * 1024 * 1024, perTenantBytes: 64 * 1024 * 1024, totalBytes: 256 * 1024 * 1024 };

interface Sequence {
  tenant: string;
  positions: number;
  /** The cache's bytes and the last step's. */
  bytes: number;
  last?: { position: number; input: Float32Array; output: Float32Array };
  /** The worker that holds the cache (a restarted worker holds none). */
  worker: InferenceThread;
}

function sameValues(a: Float32Array, b: Float32Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}


/** One worker thread and the steps it is computing. */
class InferenceThread {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (h: Float32Array) => void; reject: (e: unknown) => void }>();
  readonly ready: Promise<void>;
  #next = 1;
  dead: Error | undefined;
  /** Marks the thread dead once: its pending steps fail, its owner forgets its sequences. */
  readonly #die: (error: Error) => void;

  constructor(start: InferenceWorkerStart, onDeath: (thread: InferenceThread) => void) {
    this.#worker = startTsWorker(new URL('./split-inference-worker.ts', import.meta.url), start);
    let started: (() => void) | undefined;
    let failed: ((e: Error) => void) | undefined;
    this.ready = new Promise<void>((resolve, reject) => {
      started = resolve;
      failed = reject;
    });
    // A worker that fails to start is reported to the step that waits for it.
    this.ready.catch(() => undefined);
    this.#worker.on('message', (m: InferenceWorkerReply) => {
      if (m.op === 'ready') {
        started?.();
        this.#idle();
        return;
      }
      const p = this.#pending.get(m.req);
      this.#pending.delete(m.req);
      this.#idle();
      if (m.op === 'stepped') p?.resolve(m.h);
      else p?.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `split inference: ${m.message}` }));
    });
    this.#die = (error: Error): void => {
      if (this.dead !== undefined) return;
      this.dead = error;
      failed?.(error);
      for (const p of this.#pending.values()) p.reject(new CloudError('TANDEM_COMPUTE_FAILED', { reason: `split inference: the worker stopped (${error.message}); start the sequence again at position 0` }));
      this.#pending.clear();
      onDeath(this);
    };
    this.#worker.on('error', this.#die);
    this.#worker.on('exit', (code) => this.#die(new Error(`exit code ${code}`)));
  }

  /** An idle worker does not keep the process alive. */
  #idle(): void {
    if (this.#pending.size === 0) this.#worker.unref();
  }

  async step(request: Omit<Extract<InferenceWorkerRequest, { op: 'step' }>, 'op' | 'req'>): Promise<Float32Array> {
    await this.ready.catch(() => undefined);
    if (this.dead !== undefined) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `split inference: the worker stopped (${this.dead.message})` });
    const req = this.#next++;
    this.#worker.ref();
    const h = request.h.slice();
    return new Promise((resolve, reject) => {
      this.#pending.set(req, { resolve, reject });
      this.#worker.postMessage({ op: 'step', req, ...request, h } satisfies InferenceWorkerRequest, [h.buffer]);
    });
  }

  end(seq: string): void {
    if (this.dead === undefined) this.#worker.postMessage({ op: 'end', seq } satisfies InferenceWorkerRequest);
  }

  /** Ends the worker; dead once this resolves, whichever of its exit event and this comes first. */
  async terminate(): Promise<void> {
    await this.#worker.terminate();
    this.#die(new Error('terminated'));
  }
}

export class SplitInference {
  readonly #limits: SplitInferenceLimits;
  readonly #sequences = new Map<string, Sequence>();
  /** Each session's latest step: the next waits for it. */
  readonly #chains = new Map<string, Promise<unknown>>();
  #bytes = 0;
  readonly #tenantBytes = new Map<string, number>();
  readonly #onBytes: (bytes: number) => void;
  #backends: string[] = [];
  #engine: 'ort-cpu' | 'ort-cuda' | undefined;
  #thread: InferenceThread | undefined;
  #closing = false;

  readonly #events: SplitInferenceEvents;

  constructor(limits: Partial<SplitInferenceLimits> = {}, events: SplitInferenceEvents = {}) {
    this.#limits = { ...DEFAULT_SPLIT_INFERENCE_LIMITS, ...limits };
    this.#events = events;
    this.#onBytes = events.onBytes ?? (() => {});
  }

  /** What the worker computes with: ONNX Runtime when the node's middle runs on it, else the tfjs backends in turn (the node's thread's first). */
  useCompute(compute: { backends: readonly string[]; engine?: 'ort-cpu' | 'ort-cuda' }): void {
    this.#backends = [...compute.backends];
    this.#engine = compute.engine;
  }

  get bytes(): number {
    return this.#bytes;
  }

  /** Middle blocks [start, end) on h_B [1, tokens, hidden] at `position`; returns h_M. */
  step(served: ServedModel, range: { start: number; end: number }, session: { id: string; tenant: string }, position: number, h: Float32Array, shape: readonly [number, number, number]): Promise<Float32Array> {
    const sessionId = session.id;
    const run = (this.#chains.get(sessionId) ?? Promise.resolve()).catch(() => undefined).then(() => this.#step(served, range, session, position, h, shape));
    this.#chains.set(sessionId, run);
    void run.catch(() => undefined).finally(() => {
      if (this.#chains.get(sessionId) === run) this.#chains.delete(sessionId);
    });
    return run;
  }

  async #step(served: ServedModel, range: { start: number; end: number }, session: { id: string; tenant: string }, position: number, h: Float32Array, shape: readonly [number, number, number]): Promise<Float32Array> {
    const { id: sessionId, tenant } = session;
    const held = this.#sequences.get(sessionId)?.last;
    if (held !== undefined && held.position === position && sameValues(held.input, h)) {
      this.#events.onStep?.('replayed');
      return held.output.slice();
    }
    if (position === 0) this.end(sessionId);
    const found = this.#sequences.get(sessionId);
    const positions = found?.positions ?? 0;
    if (position !== positions) throw new ProtocolError('TANDEM_PROTO_INFER_POSITION_INVALID', { session: sessionId, actual: position, expected: positions });
    if (shape[0] !== 1) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'infer_step.frames[0] (h_B)', reason: `batch ${shape[0]}: split inference runs one sequence, batch 1` });
    const reach = position + shape[1];
    const context = served.config.maxPositionEmbeddings;
    if (reach > context) throw new ProtocolError('TANDEM_PROTO_INFER_CONTEXT_EXCEEDED', { actual: reach, limit: context });
    const blocks = range.end - range.start;
    const bytes = reach * (kvBytesPerToken(served.model) / served.numLayers) * blocks + 2 * h.byteLength;
    const before = found?.bytes ?? 0;
    if (bytes > this.#limits.perSessionBytes) throw new ProtocolError('TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED', { session: sessionId, actual: bytes, limit: this.#limits.perSessionBytes });
    const tenantBytes = (this.#tenantBytes.get(tenant) ?? 0) - before + bytes;
    if (tenantBytes > this.#limits.perTenantBytes) throw new ProtocolError('TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED', { session: sessionId, actual: tenantBytes, limit: `${this.#limits.perTenantBytes} (tenant ${tenant}'s sessions)` });
    if (this.#bytes - before + bytes > this.#limits.totalBytes) throw new ProtocolError('TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED', { session: sessionId, actual: this.#bytes - before + bytes, limit: `${this.#limits.totalBytes} (all sessions)` });
    const worker = found?.worker ?? this.#worker(served);
    // Counted before the compute: concurrent sessions cannot overrun the budget together.
    const seq: Sequence = found ?? { tenant, positions: 0, bytes: 0, worker };
    this.#sequences.set(sessionId, seq);
    this.#resize(seq, bytes);
    let out: Float32Array;
    try {
      out = await worker.step({ seq: sessionId, start: range.start, end: range.end, position, tokens: shape[1], h });
    } catch (error) {
      // The cache may hold part of this step: the sequence starts again.
      this.end(sessionId);
      throw error;
    }
    seq.positions = reach;
    seq.last = { position, input: h.slice(), output: out.slice() };
    this.#events.onStep?.('computed');
    return out;
  }

  #resize(seq: Sequence, bytes: number): void {
    this.#bytes += bytes - seq.bytes;
    const tenantBytes = (this.#tenantBytes.get(seq.tenant) ?? 0) + bytes - seq.bytes;
    if (tenantBytes > 0) this.#tenantBytes.set(seq.tenant, tenantBytes);
    else this.#tenantBytes.delete(seq.tenant);
    seq.bytes = bytes;
    this.#onBytes(this.#bytes);
  }

  #worker(served: ServedModel): InferenceThread {
    if (this.#thread === undefined || this.#thread.dead !== undefined) {
      const backends = this.#backends.length > 0 ? this.#backends : ['cpu'];
      this.#thread = new InferenceThread({ modelDir: served.dir, backends, engine: this.#engine }, (dead) => this.#died(dead));
    }
    return this.#thread;
  }

  /** The caches of a worker that stopped are gone: their sequences start again at 0. */
  #died(thread: InferenceThread): void {
    for (const [id, seq] of this.#sequences) if (seq.worker === thread) this.end(id);
    if (this.#thread === thread) this.#thread = undefined;
    if (!this.#closing) this.#events.onWorkerStopped?.();
  }

  /** Frees the session's cache (nothing when it has none). */
  end(sessionId: string): void {
    const seq = this.#sequences.get(sessionId);
    if (seq === undefined) return;
    seq.worker.end(sessionId);
    this.#resize(seq, 0);
    this.#sequences.delete(sessionId);
  }

  /** Ends the worker as a crash would (operations, tests): its sequences start again at position 0. False when none runs. */
  async terminateWorker(): Promise<boolean> {
    const thread = this.#thread;
    if (thread === undefined || thread.dead !== undefined) return false;
    await thread.terminate();
    return true;
  }

  /** Frees every cache and stops the worker. */
  async clear(): Promise<void> {
    this.#closing = true;
    for (const id of [...this.#sequences.keys()]) this.end(id);
    const thread = this.#thread;
    this.#thread = undefined;
    await thread?.terminate();
  }
}
