// The gateway's MiddleRunner: the middle runs on the cluster's workers, reached over NATS
// request/reply. A session's middle is computed by the chain of owned ranges that covers it
// (one range, or a pipeline: forward through the ranges in order, backward in reverse). A
// forward's tape stays on the worker that ran it and its backward goes to that worker's own
// subject; if the worker is gone (no responders, no answer, it lost the tape) the segment is
// recomputed from its input by any worker of the range. A request to a range that is not
// answered in time, or finds no worker, goes again to the range (another worker) until the
// deadline: the middle is frozen, so computing a forward twice changes nothing. A request to a
// range goes first to the live worker of it that this gateway keeps least busy.
import { nuid } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import type { Logger } from 'pino';
import { CloudError } from '../errors.ts';
import { TapeLost } from '../middle-executor.ts';
import type { HeldLora } from '../middle-compute.ts';
import type { BlockRange, InputFrames, KeptTape, MiddleRunner, Shape3 } from '../middle-runner.ts';
import { frameBytes } from '../../protocol/index.ts';
import type { TensorFrame } from '../../protocol/index.ts';
import { coverRange } from './block-ranges.ts';
import type { PipelineSegment } from './block-ranges.ts';
import { connectNats } from './nats-connection.ts';
import { RECOMMENDED_MAX_PAYLOAD, SPILL_BUCKET, WireSpill } from './wire-spill.ts';
import type { HeldBody } from './wire-spill.ts';
import { WorkerDirectory } from './worker-directory.ts';
import { CLAIMS_PREFIX, CLAIM_ID_HEADER, CLAIM_TO_HEADER, WAIT_HEADER, decodeReply, encodeRequest, rangeSubject, traceHeaders, workerSubject } from './wire.ts';
import type { MiddleReply, MiddleRequest } from './wire.ts';

export interface ClusterExecutorOptions {
  natsUrl: string;
  /** The served model's content hash: workers of other models are not used. */
  contentHash: string;
  /**
   * How long a request may wait for a worker to claim it (workers claim on receipt) before the
   * range is asked again (10 s). A claimed request is waited for while its worker keeps
   * announcing itself, however long the compute takes, up to requestTimeoutMs.
   */
  attemptTimeoutMs?: number;
  /** All attempts of one request together (25 s: below the edge's 30 s request timeout). */
  requestTimeoutMs?: number;
  /**
   * The bytes of one tenant's request bodies over max_payload that this gateway keeps in the
   * object store at once (16 bodies just over max_payload): the store is the NATS server's
   * memory, shared by every tenant. A tenant's first such body is always taken.
   */
  spillBytesPerTenant?: number;
  log?: Logger;
}

/** The NATS hop, measured: round trips against the workers' own compute time. */
export interface HopStats {
  requests: number;
  roundTripMs: number;
  computeMs: number;
  /** Bytes of the bodies of those requests (an edge's lossy frame travels as it came, not as float32). */
  requestBytes: number;
  /** Requests whose body was over max_payload and went through the object store. */
  spilled: number;
}

interface Link {
  segment: PipelineSegment;
  /** The segment's input (h_B for the first): what a recompute needs. */
  input: Float32Array;
  worker: string;
  tapeId: number;
  used: boolean;
}

class ClusterTape implements KeptTape {
  readonly savedBytes: number;
  readonly links: Link[];
  used = false;
  readonly #drop: (link: Link) => void;

  constructor(links: Link[], drop: (link: Link) => void) {
    this.links = links;
    // The gateway holds the inputs of the later segments (the first is the cache's h_B).
    this.savedBytes = links.slice(1).reduce((n, l) => n + l.input.byteLength, 0);
    this.#drop = drop;
  }

  dispose(): void {
    if (this.used) return;
    this.used = true;
    for (const link of this.links) if (!link.used) this.#drop(link);
  }
}

function causeNames(error: unknown): string[] {
  const names: string[] = [];
  let e: unknown = error;
  for (let i = 0; i < 4 && e instanceof Error; i++) {
    names.push(e.name, e.constructor.name);
    e = e.cause;
  }
  return names;
}

const isNoResponders = (error: unknown): boolean => causeNames(error).some((n) => /NoResponders/i.test(n)) || /no responders/i.test(String((error as Error).message));
const isTimeout = (error: unknown): boolean => causeNames(error).some((n) => /Timeout/i.test(n));
/** No worker claimed the request in time, or the worker that claimed it went silent. */
class AttemptAbandoned extends Error {
  override readonly name = 'AttemptAbandoned';
}

/**
 * The edge's frame of tensor `field`, to send in place of its float32 values when it is
 * smaller (a lossy codec's); an f32 frame is the values themselves, sent as they are.
 */
function sent(field: 'h' | 'g', frame: TensorFrame | undefined): { hFrame?: TensorFrame; gFrame?: TensorFrame } {
  if (frame === undefined || frameBytes(frame) >= 4 * frame.shape.reduce((n, d) => n * d, 1)) return {};
  return field === 'h' ? { hFrame: frame } : { gFrame: frame };
}

/** A request's `lora`: the part of a held adapter on blocks `blocks` (its modules are in model order); none when it has none there. */
function loraOn(lora: HeldLora | undefined, blocks: BlockRange): { lora?: HeldLora } {
  if (lora === undefined) return {};
  const on = (path: string): boolean => {
    const layer = Number(path.split('.')[2]);
    return layer >= blocks.start && layer < blocks.end;
  };
  const modules = lora.modules.filter((m) => on(m.path));
  const ia3 = lora.ia3?.filter((m) => on(m.path));
  if (modules.length + (ia3?.length ?? 0) === 0) return {};
  return { lora: { scale: lora.scale, modules, ...(ia3 === undefined ? {} : { ia3 }) } };
}

/** The lengths of a held adapter's gradients as a backward answers them: A then B of each module, then each (IA)^3 scale. */
function gradLengths(lora: HeldLora): number[] {
  return [...lora.modules.flatMap((m) => [m.a.length, m.b.length]), ...(lora.ia3 ?? []).map((m) => m.scale.length)];
}

/** A reply's msgpack framing and small fields, beyond its output tensor. */
const REPLY_OVERHEAD_BYTES = 4096;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class ClusterExecutor implements MiddleRunner {
  readonly #nc: NatsConnection;
  readonly #directory: WorkerDirectory;
  readonly #options: ClusterExecutorOptions;
  readonly #hop: Omit<HopStats, 'spilled'> = { requests: 0, roundTripMs: 0, computeMs: 0, requestBytes: 0 };
  #inFlight = 0;
  #retries = 0;
  #closed = false;
  #ownsConnection = true;
  /** Claims of requests in flight: claim id → the worker that took it. */
  readonly #claims = new Map<string, string>();
  readonly #claimSubject = `${CLAIMS_PREFIX}${nuid.next()}`;
  readonly #spill: WireSpill;
  /** This gateway's requests in flight to each worker (sent to its own subject). */
  readonly #perWorker = new Map<string, number>();
  /** Each tenant's request bodies in the object store now (bytes). */
  readonly #spilledBytes = new Map<string, number>();

  private constructor(nc: NatsConnection, options: ClusterExecutorOptions) {
    this.#nc = nc;
    this.#options = options;
    this.#directory = new WorkerDirectory(nc, options.contentHash);
    this.#spill = new WireSpill(nc);
    nc.subscribe(this.#claimSubject, {
      callback: (err, msg) => {
        if (err !== null || msg.data.byteLength > 512) return;
        try {
          const claim = JSON.parse(Buffer.from(msg.data).toString('utf8')) as { id?: unknown; worker?: unknown };
          if (typeof claim.id === 'string' && typeof claim.worker === 'string' && this.#claims.has(claim.id)) this.#claims.set(claim.id, claim.worker);
        } catch {
          // not a claim
        }
      },
    });
  }

  /** Over `connection` (which the caller closes), or a connection of its own to `natsUrl`. */
  static async connect(options: ClusterExecutorOptions, connection?: NatsConnection): Promise<ClusterExecutor> {
    const executor = new ClusterExecutor(connection ?? (await connectNats(options.natsUrl, `tandem-gateway-${process.pid}`, 'gateway')), options);
    executor.#ownsConnection = connection === undefined;
    // Workers may not create the bucket their replies over max_payload go through: the gateway does.
    if (!(await executor.#spill.prepare())) options.log?.warn({ bucket: SPILL_BUCKET }, 'the object store for bodies over max_payload could not be created (is JetStream enabled?): such bodies will fail');
    const maxPayload = executor.#nc.info?.max_payload;
    if (maxPayload !== undefined && maxPayload < RECOMMENDED_MAX_PAYLOAD) {
      options.log?.warn({ maxPayload, recommended: RECOMMENDED_MAX_PAYLOAD },
        `the NATS server's max_payload is ${maxPayload} bytes: activations over it go through the JetStream object store, which hashes and acknowledges every chunk (several times the cost of inline); infra/nats sets max_payload: ${RECOMMENDED_MAX_PAYLOAD}`);
    }
    return executor;
  }

  /** The workers' announcements: the cluster's ClusterStatusSource. */
  get directory(): WorkerDirectory {
    return this.#directory;
  }

  /** The NATS connection (the JetStream state uses the same one). */
  get connection(): NatsConnection {
    return this.#nc;
  }

  get ready(): boolean {
    return !this.#closed && this.#directory.servingWorkers().length > 0;
  }

  get workers(): number {
    return this.#directory.servingWorkers().length;
  }

  /** Requests sent again to a range (a worker gone or silent). */
  get restarts(): number {
    return this.#retries;
  }

  get backend(): string {
    return 'nats';
  }

  /** The gateway does not see the workers' queues: its requests in flight count as queued (each worker reports its own load). */
  get queued(): number {
    return this.#inFlight;
  }

  /** What the workers compute is reported by them (WorkerStatus.load); the gateway computes nothing. */
  get running(): number {
    return 0;
  }

  get hop(): HopStats {
    return { ...this.#hop, spilled: this.#spill.stats.spilled };
  }

  async forward(range: BlockRange, h: Float32Array, shape: Shape3, tenant = '', frames: InputFrames = {}): Promise<Float32Array> {
    const segments = await this.#plan(range);
    return (await this.#inputs(segments, segments.length, h, shape, tenant, frames)).at(-1) as Float32Array;
  }

  /**
   * The first `count` segments' forwards without tapes (with a held adapter's part on each):
   * `h`, then each one's output, in order.
   */
  async #inputs(segments: readonly PipelineSegment[], count: number, h: Float32Array, shape: Shape3, tenant: string, frames: InputFrames, lora?: HeldLora): Promise<Float32Array[]> {
    const inputs: Float32Array[] = [h];
    for (const [i, segment] of segments.slice(0, count).entries()) {
      const request = { op: 'forward' as const, blocks: segment.blocks, shape, h: inputs[i], ...sent('h', i === 0 ? frames.h : undefined), keepTape: false, ...loraOn(lora, segment.blocks) };
      inputs.push((await this.#toRange(segment, request, tenant)).output);
    }
    return inputs;
  }

  /** g_M → g_B through every segment in reverse, each recomputing from its input; with a held adapter, its gradients per segment. */
  async #backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant: string, frames: InputFrames, lora?: HeldLora): Promise<{ output: Float32Array; loraGrads: Float32Array[][] }> {
    const segments = await this.#plan(range);
    // A pipeline needs each segment's input: the forward again, without tapes.
    const inputs = await this.#inputs(segments, segments.length - 1, h, shape, tenant, frames, lora);
    let grad = g;
    const loraGrads: Float32Array[][] = [];
    for (let i = segments.length - 1; i >= 0; i--) {
      const request = {
        op: 'backward' as const, blocks: segments[i].blocks, shape, h: inputs[i], g: grad,
        ...sent('h', i === 0 ? frames.h : undefined), ...sent('g', i === segments.length - 1 ? frames.g : undefined), ...loraOn(lora, segments[i].blocks),
      };
      const reply = await this.#toRange(segments[i], request, tenant);
      grad = reply.output;
      loraGrads[i] = reply.loraGrads ?? [];
    }
    return { output: grad, loraGrads };
  }

  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3, tenant = '', frames: InputFrames = {}): Promise<{ output: Float32Array; tape: KeptTape }> {
    const links: Link[] = [];
    let x = h;
    try {
      for (const [i, segment] of (await this.#plan(range)).entries()) {
        const reply = await this.#toRange(segment, { op: 'forward', blocks: segment.blocks, shape, h: x, ...sent('h', i === 0 ? frames.h : undefined), keepTape: true }, tenant);
        links.push({ segment, input: x, worker: reply.worker, tapeId: reply.tapeId ?? 0, used: false });
        x = reply.output;
      }
    } catch (error) {
      for (const link of links) this.#dropTape(link);
      throw error;
    }
    return { output: x, tape: new ClusterTape(links, (link) => this.#dropTape(link)) };
  }

  async backwardFromTape(tape: KeptTape, g: Float32Array, shape: Shape3, tenant = '', frames: InputFrames = {}): Promise<Float32Array> {
    if (!(tape instanceof ClusterTape) || tape.used) throw new TapeLost('the tape is gone');
    tape.used = true;
    let grad = g;
    // The edge's g_M frame goes to the last range, which receives g_M itself.
    let gFrame = frames.g;
    for (const link of [...tape.links].reverse()) {
      link.used = true;
      try {
        grad = (await this.#toWorker(link, grad, gFrame, shape, tenant)).output;
      } catch (error) {
        if (!(error instanceof TapeLost)) throw error;
        // The worker is gone or dropped the tape: any worker of the range recomputes.
        grad = (await this.#toRange(link.segment, { op: 'backward', blocks: link.segment.blocks, shape, h: link.input, g: grad, ...sent('g', gFrame) }, tenant)).output;
      }
      gFrame = undefined;
    }
    return grad;
  }

  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant = '', frames: InputFrames = {}): Promise<Float32Array> {
    return (await this.#backward(range, h, g, shape, tenant, frames)).output;
  }

  /** The workers run held middle adapters: the gateway holds each (held-adapters.ts) and sends its factors with every request. */
  get holdsAdapters(): boolean {
    return true;
  }

  /** h_B → h_M with a session's held adapter: each range of the chain with its part of the factors; no tape is kept. */
  async forwardHeld(range: BlockRange, h: Float32Array, shape: Shape3, tenant: string, lora: HeldLora): Promise<Float32Array> {
    const segments = await this.#plan(range);
    return (await this.#inputs(segments, segments.length, h, shape, tenant, {}, lora)).at(-1) as Float32Array;
  }

  /**
   * g_M → g_B with a session's held adapter, each range recomputing from its input (a pipeline's
   * inputs by a forward first), and the factors' gradients in the adapter's order.
   */
  async backwardHeld(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant: string, lora: HeldLora): Promise<{ output: Float32Array; loraGrads: Float32Array[] }> {
    const { output, loraGrads: perSegment } = await this.#backward(range, h, g, shape, tenant, {}, lora);
    const loraGrads = perSegment.flat();
    if (loraGrads.length !== gradLengths(lora).length) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'the workers returned gradients for another set of the held adapter\'s tensors' });
    return { output, loraGrads };
  }

  async terminateWorker(index: number): Promise<void> {
    throw new CloudError('TANDEM_REQUEST_INVALID', { reason: `worker ${index} is a process of the cluster: stop it there (a gateway cannot end it)` });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#directory.close();
    if (this.#ownsConnection) await this.#nc.drain().catch(() => undefined);
  }

  /** The ranges that compute `range`, waiting (up to the deadline) for workers to announce them. */
  async #plan(range: BlockRange): Promise<PipelineSegment[]> {
    const deadline = Date.now() + (this.#options.requestTimeoutMs ?? 25_000);
    for (;;) {
      if (this.#closed) throw new CloudError('TANDEM_MODEL_NOT_READY');
      const plan = coverRange(range, this.#directory.ranges());
      if (plan !== undefined) return plan;
      if (Date.now() >= deadline) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `no live worker owns every block of [${range.start}, ${range.end}); workers own ${this.#directory.ranges().map((r) => `[${r.start}, ${r.end})`).join(' ') || 'nothing'}` });
      await this.#directory.changed(Math.min(500, deadline - Date.now()));
    }
  }

  async #send(subject: string, body: HeldBody, bytes: number, op: MiddleRequest['op'], elements: number, tenant: string, patienceMs: number, deadline: number, loraLengths?: readonly number[]): Promise<MiddleReply> {
    const started = performance.now();
    const claimId = nuid.next();
    const headers = body.label(traceHeaders({ requestId: claimId, tenant }));
    headers.set(CLAIM_TO_HEADER, this.#claimSubject);
    headers.set(CLAIM_ID_HEADER, claimId);
    this.#claims.set(claimId, '');
    const sentAt = Date.now();
    headers.set(WAIT_HEADER, String(Math.max(1, Math.ceil(deadline - sentAt))));
    let timer: ReturnType<typeof setInterval> | undefined;
    try {
      const pending = this.#nc.request(subject, body.data, { timeout: Math.max(1, deadline - sentAt), headers });
      pending.catch(() => undefined);
      const abandoned = new Promise<never>((_resolve, reject) => {
        timer = setInterval(() => {
          const worker = this.#claims.get(claimId) ?? '';
          if (worker === '' ? Date.now() - sentAt > patienceMs : !this.#directory.isLive(worker)) reject(new AttemptAbandoned(worker === '' ? `no worker claimed it within ${patienceMs} ms` : `worker ${worker} went silent`));
        }, 100);
      });
      abandoned.catch(() => undefined);
      const msg = await Promise.race([pending, abandoned]);
      const loraBytes = (loraLengths ?? []).reduce((n, l) => n + l * 4, 0);
      const replyBytes = await this.#spill.incoming(msg, elements * 4 + loraBytes + REPLY_OVERHEAD_BYTES).catch((error: unknown) => {
        throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `the reply to a ${op} cannot be read: ${(error as Error).message}`.slice(0, 300) });
      });
      let reply: MiddleReply;
      try {
        reply = decodeReply(replyBytes, elements, loraLengths);
      } catch (error) {
        throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `the reply to a ${op} is invalid: ${(error as Error).message}`.slice(0, 300) });
      }
      if (reply.ok) {
        this.#hop.requests++;
        this.#hop.roundTripMs += performance.now() - started;
        this.#hop.computeMs += reply.computeMs;
        this.#hop.requestBytes += bytes;
      }
      return reply;
    } finally {
      clearInterval(timer);
      this.#claims.delete(claimId);
    }
  }

  /**
   * `request`'s body for all its tries: over max_payload it is stored in the object store once,
   * within the tenant's share, and deleted when the request ends (answered, failed, out of time).
   */
  async #withBody<T>(request: MiddleRequest, tenant: string, use: (body: HeldBody, bytes: number) => Promise<T>): Promise<T> {
    const encoded = encodeRequest(request);
    const spilling = this.#spill.spills(encoded.byteLength) ? encoded.byteLength : 0;
    const held = this.#spilledBytes.get(tenant) ?? 0;
    const limit = this.#options.spillBytesPerTenant ?? 16 * this.#spill.inlineLimit;
    if (spilling > 0 && held > 0 && held + spilling > limit) {
      throw new CloudError('TANDEM_QUOTA_EXCEEDED', { tenant, quota: 'request bodies over max_payload in flight', limit: `${limit} bytes`, reason: `${held} bytes of its requests are in the object store and this ${request.op} needs ${spilling} more; retry when they end` });
    }
    // Counted from before the put to after the delete: what the tenant may hold in the store.
    const unhold = (): void => {
      if (spilling === 0) return;
      const left = (this.#spilledBytes.get(tenant) ?? spilling) - spilling;
      if (left <= 0) this.#spilledBytes.delete(tenant);
      else this.#spilledBytes.set(tenant, left);
    };
    if (spilling > 0) this.#spilledBytes.set(tenant, held + spilling);
    let body: HeldBody;
    try {
      body = await this.#spill.hold(encoded);
    } catch (error) {
      unhold();
      if (error instanceof CloudError) throw error;
      throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `a ${request.op} cannot reach the workers: ${(error as Error).message}`.slice(0, 300) });
    }
    try {
      return await use(body, encoded.byteLength);
    } finally {
      void body.release().finally(unhold);
    }
  }

  #failed(reply: Extract<MiddleReply, { ok: false }>): Error {
    if (reply.kind === 'tapeLost') return new TapeLost(reply.message);
    if (reply.code === 'TANDEM_STORE_FULL') return new CloudError('TANDEM_STORE_FULL', { store: `cluster's object store ${SPILL_BUCKET} for the reply`, reason: `worker ${reply.worker}: ${reply.message}`.slice(0, 300) });
    if (reply.code === 'TANDEM_RESOURCE_EXHAUSTED') return new CloudError('TANDEM_RESOURCE_EXHAUSTED', { resource: `resources of worker ${reply.worker}`, reason: reply.message.slice(0, 300) });
    return new CloudError('TANDEM_COMPUTE_FAILED', { reason: `worker ${reply.worker}: ${reply.code ?? ''} ${reply.message}`.slice(0, 300) });
  }

  /** To any worker of the segment's range, again (another worker) on no answer, until the deadline. */
  async #toRange(segment: PipelineSegment, request: Exclude<MiddleRequest, { op: 'dropTape' | 'backwardFromTape' }>, tenant: string): Promise<Extract<MiddleReply, { ok: true }>> {
    const elements = request.shape[0] * request.shape[1] * request.shape[2];
    // A held adapter's backward answers the gradients of the factors it was sent.
    const loraLengths = request.op === 'backward' && request.lora !== undefined ? gradLengths(request.lora) : undefined;
    const deadline = Date.now() + (this.#options.requestTimeoutMs ?? 25_000);
    this.#inFlight++;
    try {
      return await this.#withBody(request, tenant, (body, bytes) => this.#tries(segment, body, bytes, request.op, elements, tenant, deadline, loraLengths));
    } finally {
      this.#inFlight--;
    }
  }

  /** #toRange's tries, each with the same body. */
  async #tries(segment: PipelineSegment, body: HeldBody, bytes: number, op: MiddleRequest['op'], elements: number, tenant: string, deadline: number, loraLengths?: readonly number[]): Promise<Extract<MiddleReply, { ok: true }>> {
    const attempt = this.#options.attemptTimeoutMs ?? 10_000;
    const rangeWide = rangeSubject(this.#options.contentHash, segment.owner);
    for (let tries = 0; ; tries++) {
      // First to the live worker of the range this gateway keeps least busy (a queue group picks
      // at random: 4 sessions on 2 workers often land 3 and 1); again, to any worker of the range.
      const chosen = tries === 0 ? this.#leastBusy(segment.owner) : undefined;
      const subject = chosen === undefined ? rangeWide : workerSubject(chosen);
      if (this.#closed) throw new CloudError('TANDEM_MODEL_NOT_READY');
      const left = deadline - Date.now();
      if (left <= 0) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: `no worker of blocks [${segment.owner.start}, ${segment.owner.end}) answered within ${this.#options.requestTimeoutMs ?? 25_000} ms (${tries} tries)` });
      if (tries > 0) this.#retries++;
      try {
        const reply = await this.#counted(chosen, () => this.#send(subject, body, bytes, op, elements, tenant, Math.max(1, Math.min(attempt, left)), deadline, loraLengths));
        if (reply.ok) return reply;
        throw this.#failed(reply);
      } catch (error) {
        if (isNoResponders(error)) {
          this.#options.log?.warn({ subject }, 'no worker of the range; waiting for one');
          await sleep(Math.min(200, Math.max(1, deadline - Date.now())));
          continue;
        }
        if (isTimeout(error) || error instanceof AttemptAbandoned) {
          this.#options.log?.warn({ subject, reason: (error as Error).message }, 'the request was not answered; asking the range again');
          continue;
        }
        throw error;
      }
    }
  }

  /** To the worker that kept the tape; TapeLost when it is gone, silent or lost the tape. */
  async #toWorker(link: Link, g: Float32Array, gFrame: TensorFrame | undefined, shape: Shape3, tenant: string): Promise<Extract<MiddleReply, { ok: true }>> {
    const elements = shape[0] * shape[1] * shape[2];
    const deadline = Date.now() + (this.#options.requestTimeoutMs ?? 25_000);
    this.#inFlight++;
    try {
      const request: MiddleRequest = { op: 'backwardFromTape', tapeId: link.tapeId, shape, g, ...sent('g', gFrame) };
      const reply = await this.#withBody(request, tenant, (body, bytes) => this.#counted(link.worker, () => this.#send(workerSubject(link.worker), body, bytes, request.op, elements, tenant, this.#options.attemptTimeoutMs ?? 10_000, deadline)));
      if (reply.ok) return reply;
      throw this.#failed(reply);
    } catch (error) {
      if (error instanceof CloudError) throw error;
      if (error instanceof TapeLost || error instanceof AttemptAbandoned || isNoResponders(error) || isTimeout(error)) throw new TapeLost(`the worker ${link.worker} that kept the tape: ${(error as Error).message}`);
      throw error;
    } finally {
      this.#inFlight--;
    }
  }

  /**
   * The live worker owning exactly `owner` with the fewest of this gateway's requests in flight,
   * then the least announced load; among equals one at random (other gateways choose too).
   */
  #leastBusy(owner: BlockRange): string | undefined {
    let best: { id: string; busy: number; load: number }[] = [];
    for (const w of this.#directory.servingWorkers()) {
      if (w.blocks.start !== owner.start || w.blocks.end !== owner.end) continue;
      const c = { id: w.id, busy: this.#perWorker.get(w.id) ?? 0, load: w.load.queued + w.load.running };
      const b = best[0];
      if (b === undefined || c.busy < b.busy || (c.busy === b.busy && c.load < b.load)) best = [c];
      else if (c.busy === b.busy && c.load === b.load) best.push(c);
    }
    return best.length === 0 ? undefined : best[Math.floor(Math.random() * best.length)].id;
  }

  async #counted<T>(worker: string | undefined, send: () => Promise<T>): Promise<T> {
    if (worker === undefined) return send();
    this.#perWorker.set(worker, (this.#perWorker.get(worker) ?? 0) + 1);
    try {
      return await send();
    } finally {
      const left = (this.#perWorker.get(worker) ?? 1) - 1;
      if (left <= 0) this.#perWorker.delete(worker);
      else this.#perWorker.set(worker, left);
    }
  }

  #dropTape(link: Link): void {
    if (this.#closed || this.#nc.isClosed() || link.tapeId === 0) return;
    link.used = true;
    this.#nc.publish(workerSubject(link.worker), encodeRequest({ op: 'dropTape', tapeId: link.tapeId }));
  }
}
