// Continuous batching of generation requests over many adapters. Each loop step runs one
// batched forward (model/serving) for every request in flight: new requests join with their
// prompt (prefill, at most `prefillTokensPerStep` prompt tokens a step over all newcomers, in
// admission order, so a long prompt is run in chunks and never stalls the others' decoding
// for long), running ones with their last token, and a finished one leaves at once, freeing
// its KV slot for the next. Waiting requests are admitted tenant by tenant (the tenant with
// the fewest requests in flight first, then the one admitted longest ago, so one tenant's
// flood does not take every slot), and
// within a tenant earliest deadline first (those without one after, in arrival order), while
// their KV cache (prompt plus max_tokens, reserved whole on admission) fits the budget. A
// tenant may have at most `maxQueuePerTenant` requests waiting. Between steps the loop yields
// to the event loop, so the node answers other routes during generation.
import { GenerationLoop, kvBytesPerToken, ModelError, tfjsStepper } from '../../model/index.ts';
import type { LlamaModel, PeftAdapter, ServingStepper, StepperSequence } from '../../model/index.ts';
import { CloudError } from '../errors.ts';
import type { ServedAdapterRecord } from './adapter-registry.ts';
import type { ResidentAdapters } from './resident-adapters.ts';
import type { ServingMetrics } from './serving-metrics.ts';

/** Steps whose row counts `stepRows` keeps. */
const STEP_ROWS_KEPT = 4096;

export interface GenerationRequest {
  /** Whose request: admission is fair between tenants, and each has its own queue bound ('' when none is named). */
  tenant?: string;
  /** undefined: the base model. */
  adapter?: ServedAdapterRecord;
  promptIds: number[];
  maxTokens: number;
  temperature: number;
  topP: number;
  seed: number;
  /** Absolute time (ms since the epoch) the request should finish by; orders admission. */
  deadline?: number;
  /** Generate maxTokens tokens, past the model's eos. */
  ignoreEos?: boolean;
  /** Each new token as it is chosen; returning true ends the request (a stop sequence matched). */
  onToken?: (id: number) => boolean | void;
}

export interface GenerationOutcome {
  generatedIds: number[];
  finishReason: 'stop' | 'length';
  /** Seconds from submission to the first token. */
  timeToFirstToken: number;
  deadlineMissed: boolean;
}

export interface SchedulerOptions {
  model: LlamaModel;
  /** The engine steps run on; tfjs over `model` when absent. */
  stepper?: ServingStepper;
  adapters: ResidentAdapters;
  metrics?: ServingMetrics;
  /** Bytes of KV cache all requests in flight may reserve together. */
  kvBudgetBytes: number;
  /** Requests in one batched step. */
  maxBatch: number;
  /** Prompt tokens all newcomers run in one step together (512). */
  prefillTokensPerStep?: number;
  /** Requests waiting for a slot; more are refused. */
  maxQueue: number;
  /** Requests one tenant may have waiting (maxQueue by default); more are its 429. */
  maxQueuePerTenant?: number;
}

interface Pending {
  request: GenerationRequest;
  tenant: string;
  order: number;
  submitted: number;
  kvBytes: number;
  resolve: (o: GenerationOutcome) => void;
  reject: (e: unknown) => void;
}

interface Active extends Pending {
  loop: GenerationLoop;
  sequence: StepperSequence;
  release: () => void;
  adapterKey: string;
  next: number[] | undefined;
  /** Tokens of `next` (a prompt) already run in earlier steps. */
  prefilled: number;
  firstTokenAt?: number;
  lastTokenAt?: number;
  stopped: boolean;
}

export class ServingScheduler {
  readonly #o: SchedulerOptions;
  readonly #bytesPerToken: number;
  readonly #stepper: ServingStepper;
  #queue: Pending[] = [];
  #active: Active[] = [];
  /** Admitted, their adapter loading: they join the batch once it is loaded, the others step meanwhile. */
  readonly #loading = new Map<Pending, Promise<void>>();
  /** Ends the step loop's wait for a load when a request arrives. */
  #wake: (() => void) | undefined;
  #reserved = 0;
  #order = 0;
  /** Each tenant's last admission (a sequence number): the tie-break of fairness. */
  readonly #admittedAt = new Map<string, number>();
  #admissions = 0;
  #running = false;
  #loop: Promise<void> = Promise.resolve();
  #closed = false;
  /** Rows of each of the last STEP_ROWS_KEPT steps (for tests and benches). */
  readonly stepRows: number[] = [];

  constructor(options: SchedulerOptions) {
    this.#o = options;
    this.#bytesPerToken = kvBytesPerToken(options.model);
    this.#stepper = options.stepper ?? tfjsStepper(options.model);
  }

  get kvBytesReserved(): number {
    return this.#reserved;
  }

  /** KV bytes a request reserves: its prompt plus max_tokens positions. */
  kvBytesOf(promptTokens: number, maxTokens: number): number {
    return (promptTokens + maxTokens) * this.#bytesPerToken;
  }

  /**
   * Throws the refusal `submit` would give this request now (closed, KV over the budget, the
   * tenant's or the node's queue full): a streaming route asks before it sends its 200.
   */
  check(request: Pick<GenerationRequest, 'tenant' | 'promptIds' | 'maxTokens'>): void {
    if (this.#closed) throw new CloudError('TANDEM_MODEL_NOT_READY');
    const kvBytes = this.kvBytesOf(request.promptIds.length, request.maxTokens);
    if (kvBytes > this.#o.kvBudgetBytes) {
      throw new CloudError('TANDEM_RESOURCE_EXHAUSTED', { resource: 'KV cache', reason: `the prompt and max_tokens need ${kvBytes} bytes; the KV budget is ${this.#o.kvBudgetBytes}` });
    }
    const tenant = request.tenant ?? '';
    const perTenant = this.#o.maxQueuePerTenant ?? this.#o.maxQueue;
    const waiting = this.#queue.reduce((n, p) => n + (p.tenant === tenant ? 1 : 0), 0);
    if (waiting >= perTenant) {
      throw new CloudError('TANDEM_QUOTA_EXCEEDED', { tenant, quota: 'waiting generations', limit: perTenant, reason: `${waiting} of its requests are waiting for a slot` });
    }
    if (this.#queue.length >= this.#o.maxQueue) throw new CloudError('TANDEM_MODEL_BUSY', { waiting: this.#queue.length, limit: this.#o.maxQueue });
  }

  submit(request: GenerationRequest): Promise<GenerationOutcome> {
    try {
      this.check(request);
    } catch (error) {
      return Promise.reject(error);
    }
    const tenant = request.tenant ?? '';
    const kvBytes = this.kvBytesOf(request.promptIds.length, request.maxTokens);
    return new Promise((resolve, reject) => {
      this.#queue.push({ request, tenant, order: this.#order++, submitted: performance.now(), kvBytes, resolve, reject });
      this.#wake?.();
      this.#kick();
    });
  }

  #kick(): void {
    if (this.#running) return;
    this.#running = true;
    // A step's failure ends its requests inside #run; anything else that escapes it ends every
    // request it holds, never the process (an unhandled rejection would).
    this.#loop = this.#run().catch((err: unknown) => {
      for (const a of this.#active) this.#finish(a, err);
      this.#active = [];
    }).finally(() => {
      this.#running = false;
      if (!this.#closed && this.#queue.length > 0) this.#kick();
    });
  }

  #admit(): void {
    this.#queue.sort((a, b) => (a.request.deadline ?? Infinity) - (b.request.deadline ?? Infinity) || a.order - b.order);
    while (this.#queue.length > 0 && this.#active.length + this.#loading.size < this.#o.maxBatch) {
      const p = this.#next();
      // Strict order: a request that does not fit yet waits, and so do those behind it.
      if (this.#reserved + p.kvBytes > this.#o.kvBudgetBytes) break;
      this.#queue.splice(this.#queue.indexOf(p), 1);
      this.#noteAdmitted(p.tenant);
      this.#reserved += p.kvBytes;
      if (p.request.adapter === undefined) {
        this.#activate(p, undefined);
        continue;
      }
      // Loading an adapter (files, tensors) is not awaited here: the requests running go on stepping.
      const load = this.#o.adapters.acquire(p.request.adapter).then(
        (acquired) => {
          this.#loading.delete(p);
          // close() may have come while the adapter loaded: this request ends with the others.
          if (this.#closed) this.#refuse(p, new CloudError('TANDEM_MODEL_NOT_READY'), acquired);
          else this.#activate(p, acquired);
        },
        (err: unknown) => {
          this.#loading.delete(p);
          this.#refuse(p, err);
        },
      );
      this.#loading.set(p, load);
    }
    this.#o.metrics?.kvCacheBytes.set(this.#reserved);
  }

  /** An admitted request joins the batch (its adapter, if any, loaded and held). */
  #activate(p: Pending, acquired: { adapter: PeftAdapter; release: () => void } | undefined): void {
    try {
      const { promptIds, maxTokens, temperature, topP, seed } = p.request;
      const loop = new GenerationLoop(this.#o.model.config, promptIds, { maxNewTokens: maxTokens, temperature, topP, seed, ...(p.request.ignoreEos === true ? { stopTokenIds: [] } : {}) });
      const sequence = this.#open(acquired?.adapter, promptIds.length + maxTokens);
      this.#active.push({
        ...p, loop, sequence, release: acquired?.release ?? (() => {}),
        adapterKey: p.request.adapter === undefined ? '' : `${p.request.adapter.tenant}/${p.request.adapter.name}`, next: loop.first(), prefilled: 0, stopped: false,
      });
    } catch (err) {
      this.#refuse(p, err, acquired);
    }
  }

  /** An admitted request that will not run: its adapter and KV reservation go back. */
  #refuse(p: Pending, err: unknown, acquired?: { release: () => void }): void {
    acquired?.release();
    this.#reserved -= p.kvBytes;
    p.reject(err);
  }

  /**
   * The next request to admit: the head (by deadline, then arrival) of the waiting tenant with
   * the fewest requests in flight, ties to the tenant whose head came first. The queue is sorted.
   */
  #next(): Pending {
    const inFlight = new Map<string, number>();
    for (const a of [...this.#active, ...this.#loading.keys()]) inFlight.set(a.tenant, (inFlight.get(a.tenant) ?? 0) + 1);
    const rank = (p: Pending): [number, number] => [inFlight.get(p.tenant) ?? 0, this.#admittedAt.get(p.tenant) ?? -1];
    let best: Pending | undefined;
    const seen = new Set<string>();
    for (const p of this.#queue) {
      if (seen.has(p.tenant)) continue;
      seen.add(p.tenant);
      if (best === undefined) {
        best = p;
        continue;
      }
      const [n, at] = rank(p);
      const [bn, bat] = rank(best);
      if (n < bn || (n === bn && at < bat)) best = p;
    }
    return best!;
  }

  /** Notes that `tenant` was just admitted; forgets tenants with nothing waiting or running once many are known. */
  #noteAdmitted(tenant: string): void {
    this.#admittedAt.set(tenant, this.#admissions++);
    if (this.#admittedAt.size <= 1024) return;
    const live = new Set([...this.#queue, ...this.#active, ...this.#loading.keys()].map((p) => p.tenant));
    for (const t of [...this.#admittedAt.keys()]) if (!live.has(t)) this.#admittedAt.delete(t);
  }

  /** The request's sequence on the engine; an adapter the engine cannot run is the caller's 400. */
  #open(adapter: PeftAdapter | undefined, capacity: number): StepperSequence {
    try {
      return this.#stepper.open(adapter, capacity);
    } catch (err) {
      if (err instanceof ModelError && err.code === 'TANDEM_INPUT_INVALID') throw new CloudError('TANDEM_SERVE_ADAPTER_UNSUPPORTED', { reason: err.message, field: 'model' });
      throw err;
    }
  }

  #finish(a: Active, error?: unknown): void {
    a.sequence.free();
    a.release();
    this.#reserved -= a.kvBytes;
    if (error !== undefined) {
      this.#o.metrics?.requests.inc({ outcome: 'error' });
      a.reject(error);
      return;
    }
    const result = a.loop.result();
    const deadlineMissed = a.request.deadline !== undefined && Date.now() > a.request.deadline;
    if (deadlineMissed) this.#o.metrics?.deadlineMisses.inc();
    this.#o.metrics?.requests.inc({ outcome: 'ok' });
    a.resolve({
      generatedIds: result.generatedIds,
      finishReason: a.stopped || result.stoppedBy === 'stop-token' ? 'stop' : 'length',
      timeToFirstToken: ((a.firstTokenAt ?? performance.now()) - a.submitted) / 1000,
      deadlineMissed,
    });
  }

  async #run(): Promise<void> {
    while (!this.#closed && (this.#queue.length > 0 || this.#active.length > 0 || this.#loading.size > 0)) {
      this.#admit();
      if (this.#active.length === 0) {
        // Only adapters loading (or requests waiting for KV they hold): wait for a load or a newcomer, not in a busy loop.
        if (this.#loading.size > 0) {
          await Promise.race([...this.#loading.values(), new Promise<void>((r) => { this.#wake = r; })]);
          this.#wake = undefined;
        }
        else if (this.#queue.length > 0) await new Promise((r) => setImmediate(r));
        continue;
      }
      // The prefill budget goes to newcomers in admission order; the others wait a step.
      let budget = this.#o.prefillTokensPerStep ?? 512;
      const chunk = new Map<Active, number[]>();
      for (const a of this.#active) {
        const next = a.next as number[];
        if (next.length === 1) {
          chunk.set(a, next);
        } else if (budget > 0) {
          const take = Math.min(next.length - a.prefilled, budget);
          budget -= take;
          chunk.set(a, next.slice(a.prefilled, a.prefilled + take));
        }
      }
      // Rows of one adapter side by side: each adapter's LoRA then runs once on its group.
      const active = this.#active.filter((a) => chunk.has(a)).sort((a, b) => (a.adapterKey < b.adapterKey ? -1 : a.adapterKey > b.adapterKey ? 1 : a.order - b.order));
      const rows = active.map((a) => ({ ids: chunk.get(a) as number[], sequence: a.sequence }));
      if (rows.length > 0) {
        const started = performance.now();
        let logits: Float32Array[];
        try {
          logits = await this.#stepper.step(rows);
        } catch (err) {
          if (this.#closed) break;
          for (const a of active) this.#finish(a, err);
          this.#active = [];
          continue;
        }
        if (this.#closed) break;
        const now = performance.now();
        this.stepRows.push(rows.length);
        if (this.stepRows.length > STEP_ROWS_KEPT) this.stepRows.shift();
        this.#o.metrics?.batchRows.observe(rows.length);
        this.#o.metrics?.stepSeconds.observe((now - started) / 1000);
        this.#o.metrics?.tokens.inc(rows.length);
        this.#o.metrics?.tokensPerSecond.set(rows.length / Math.max(1e-9, (now - started) / 1000));
        const done = new Set<Active>();
        const failed = new Map<Active, unknown>();
        active.forEach((a, i) => {
          try {
            this.#advance(a, (chunk.get(a) as number[]).length, logits[i], now, done);
          } catch (err) {
            // Its sampler or its caller's onToken threw: that request ends with the error, the others go on.
            failed.set(a, err);
          }
        });
        for (const a of done) this.#finish(a);
        for (const [a, err] of failed) this.#finish(a, err);
        this.#active = this.#active.filter((a) => !done.has(a) && !failed.has(a));
      }
      await new Promise((r) => setImmediate(r));
    }
  }

  /** One request's row of a step, `ran` tokens of it: its prefill advances, or its next token is taken. */
  #advance(a: Active, ran: number, logits: Float32Array, now: number, done: Set<Active>): void {
    if (a.prefilled + ran < (a.next as number[]).length) {
      a.prefilled += ran;
      return;
    }
    a.prefilled = 0;
    const before = a.loop.result().generatedIds.length;
    try {
      a.next = a.loop.take(logits);
    } catch (err) {
      if (!(err instanceof ModelError && err.code === 'TANDEM_LOGITS_NON_FINITE')) throw err;
      throw new CloudError('TANDEM_LOGITS_NON_FINITE', { model: a.request.adapter === undefined ? 'the base model' : `adapter ${a.request.adapter.name}`, token: before, index: String(err.details?.index) }, { cause: err });
    }
    const ids = a.loop.result().generatedIds;
    if (ids.length > before) {
      if (a.firstTokenAt === undefined) {
        a.firstTokenAt = now;
        this.#o.metrics?.timeToFirstToken.observe((now - a.submitted) / 1000);
      } else if (a.lastTokenAt !== undefined) {
        this.#o.metrics?.interTokenLatency.observe((now - a.lastTokenAt) / 1000);
      }
      a.lastTokenAt = now;
      if (a.request.onToken?.(ids[ids.length - 1]) === true) {
        a.stopped = true;
        a.next = undefined;
      }
    }
    if (a.next === undefined) done.add(a);
  }

  /** Resolves once no step is running (after close(), for good). */
  async drained(): Promise<void> {
    await this.#loop.catch(() => undefined);
  }

  /** Ends every request (TANDEM_MODEL_NOT_READY) and frees their caches. */
  close(): void {
    this.#closed = true;
    const error = new CloudError('TANDEM_MODEL_NOT_READY');
    for (const a of this.#active) this.#finish(a, error);
    for (const p of this.#queue) p.reject(error);
    this.#active = [];
    this.#queue = [];
  }
}
