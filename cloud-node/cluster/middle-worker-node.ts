// A worker of a NATS cluster (`tandem cloud --role worker --blocks A-B --nats URL`): no HTTP,
// no state. It runs the middle executor (this process's compute threads) for blocks [A, B) of
// one model, answers the queue group of (model, range), where any worker of the range may
// take a request, and its own subject for the backwards from the tapes it keeps. It announces
// itself (id, model, blocks, load) about every second, and says goodbye when it stops.
import { hostname } from 'node:os';
import type { Msg, MsgHdrs, NatsConnection, Subscription } from '@nats-io/transport-node';
import type { Logger } from 'pino';
import { pino } from 'pino';
import { HELD_IA3_FEEDFORWARD, LINEAR_MODULES, expectedTensorShapes, loadModelFolder } from '../../model/index.ts';
import type { WorkerStatus } from '../cluster-status.ts';
import { MiddleExecutor, TapeLost } from '../middle-executor.ts';
import type { HeldLora } from '../middle-compute.ts';
import type { BlockRange, KeptTape } from '../middle-runner.ts';
import { parseBlockRange, rangeName } from './block-ranges.ts';
import { ClusterError } from './errors.ts';
import { connectNats } from './nats-connection.ts';
import {
  ANNOUNCE_SUBJECT, claimOf, decodeRequest, encodeReply, rangeSubject, safeWorkerId, traceOf, waitOf, workerSubject,
} from './wire.ts';
import type { MiddleReply, MiddleRequest } from './wire.ts';
import { WireSpill } from './wire-spill.ts';

export const ANNOUNCE_INTERVAL_MS = 1000;
/** Largest tensor a request may carry (elements), unless the worker is told otherwise. */
export const DEFAULT_MAX_ELEMENTS = 16384 * 8192;
/** A request's msgpack framing and small fields, beyond its two tensors. */
const REQUEST_OVERHEAD_BYTES = 4096;

export interface MiddleWorkerNodeOptions {
  modelDir: string;
  /** The model's id in announcements; the folder's base name by default. */
  modelId?: string;
  natsUrl: string;
  /** Blocks [start, end) this worker owns; `A-B` text or a range; the whole model by default. */
  blocks?: string | BlockRange;
  backend?: string;
  engine?: 'ort-cpu' | 'ort-cuda';
  /** Compute threads (1). */
  computeWorkers?: number;
  /** Bytes of tapes kept for backwards; the oldest go first (512 MiB). */
  memoryBudgetBytes?: number;
  /** A tape whose backward did not come within this long is dropped (10 min). */
  tapeTtlMs?: number;
  maxElements?: number;
  logger?: Logger;
  logLevel?: string;
}

export interface MiddleWorkerNode {
  id: string;
  contentHash: string;
  blocks: BlockRange;
  close(): Promise<void>;
}

interface Held {
  tape: KeptTape;
  storedAt: number;
  /** The forward's [batch, seq, hidden]: its backward's g must have it. */
  shape: readonly number[];
}

/** Tokens computed over the last few seconds, for the announcements' load. */
class TokenRate {
  readonly #events: { at: number; tokens: number }[] = [];

  add(tokens: number): void {
    this.#events.push({ at: Date.now(), tokens });
  }

  perSecond(windowMs = 5000): number {
    const since = Date.now() - windowMs;
    while (this.#events.length > 0 && this.#events[0].at < since) this.#events.shift();
    return this.#events.reduce((n, e) => n + e.tokens, 0) / (windowMs / 1000);
  }
}

export async function startMiddleWorkerNode(options: MiddleWorkerNodeOptions): Promise<MiddleWorkerNode> {
  const log = options.logger ?? pino({ name: 'tandem-worker', level: options.logLevel ?? 'info' }, pino.destination(2));
  // The model's config and content hash; its weights are the compute thread's to hold, not this thread's.
  const { config, contentHash } = await (async () => {
    const loaded = await loadModelFolder(options.modelDir);
    return { config: loaded.config, contentHash: `sha256:${loaded.contentHash}` };
  })();
  const numLayers = config.numHiddenLayers;
  const modelId = options.modelId ?? options.modelDir.replace(/\/+$/, '').split('/').at(-1) ?? 'model';
  const blocks = options.blocks === undefined ? { start: 0, end: numLayers }
    : typeof options.blocks === 'string' ? parseBlockRange(options.blocks, numLayers) : parseBlockRange(rangeName(options.blocks), numLayers);
  const maxElements = options.maxElements ?? DEFAULT_MAX_ELEMENTS;
  const budget = options.memoryBudgetBytes ?? 512 * 1024 * 1024;
  const ttlMs = options.tapeTtlMs ?? 10 * 60 * 1000;
  const id = safeWorkerId(`${hostname()}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);

  const executor = await MiddleExecutor.start({ modelDir: options.modelDir, backend: options.backend, engine: options.engine, workers: options.computeWorkers, log: log.child({ plane: 'compute' }) });
  let nc: NatsConnection;
  try {
    nc = await connectNats(options.natsUrl, `tandem-worker-${id}`, 'worker');
  } catch (error) {
    await executor.close();
    throw error;
  }

  const tapes = new Map<number, Held>();
  let tapeBytes = 0;
  let nextTape = 1;
  let running = 0;
  const rate = new TokenRate();
  const drop = (tapeId: number): void => {
    const held = tapes.get(tapeId);
    if (held === undefined) return;
    tapes.delete(tapeId);
    tapeBytes -= held.tape.savedBytes;
    held.tape.dispose();
  };
  const keep = (tape: KeptTape, shape: readonly number[]): number => {
    const tapeId = nextTape++;
    tapes.set(tapeId, { tape, storedAt: Date.now(), shape: [...shape] });
    tapeBytes += tape.savedBytes;
    // The oldest leave first; their backwards recompute from h_B on whichever worker gets them.
    for (const old of tapes.keys()) {
      if (tapeBytes <= budget || old === tapeId) break;
      drop(old);
    }
    return tapeId;
  };
  const inside = (range: BlockRange): void => {
    if (range.start < blocks.start || range.end > blocks.end) {
      throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: 'blocks', reason: `[${range.start}, ${range.end}) is not inside this worker's [${blocks.start}, ${blocks.end})` });
    }
  };

  // Checked before anything computes: the wire checked sizes against the shape, this the shape against the model.
  const hidden = config.hiddenSize;
  const context = config.maxPositionEmbeddings;
  const fits = (shape: readonly number[]): void => {
    if (shape[2] !== hidden) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: 'shape', reason: `hidden size ${shape[2]} is not the model's ${hidden}` });
    if (shape[1] > context) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: 'shape', reason: `a sequence of ${shape[1]} is over the model's context of ${context}` });
  };

  // A held adapter's modules: the model's own linear weights ([out, in], by their exact names) of the request's blocks.
  const shapes = expectedTensorShapes(config);
  const heldFits = (lora: HeldLora, range: BlockRange): void => {
    const bad = (field: string, reason: string): ClusterError => new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field, reason });
    const moduleOf = (path: string, field: string): [number, number] => {
      const weight = shapes.get(`${path}.weight`);
      const layer = Number(path.split('.')[2]);
      if (weight === undefined || weight.length !== 2 || !LINEAR_MODULES.some((m) => path.endsWith(`.${m}`)) || !(layer >= range.start && layer < range.end)) {
        throw bad(field, `${path} is not a linear module of blocks [${range.start}, ${range.end})`);
      }
      return [weight[1], weight[0]];
    };
    const rank = lora.modules[0]?.r;
    lora.modules.forEach((m, i) => {
      const [inF, outF] = moduleOf(m.path, `lora.modules[${i}].path`);
      if (m.inFeatures !== inF || m.outFeatures !== outF) throw bad(`lora.modules[${i}]`, `${m.path} is [${outF}, ${inF}], not [${m.outFeatures}, ${m.inFeatures}]`);
      if (m.r !== rank) throw bad(`lora.modules[${i}].r`, `${m.r}: the modules of one adapter have one rank (${rank})`);
    });
    lora.ia3?.forEach((m, i) => {
      const [inF, outF] = moduleOf(m.path, `lora.ia3[${i}].path`);
      const feedforward = HELD_IA3_FEEDFORWARD.some((f) => m.path.endsWith(`.${f}`));
      if (m.feedforward !== feedforward) throw bad(`lora.ia3[${i}].feedforward`, `${m.path} is ${feedforward ? '' : 'not '}a feed-forward module (its input is scaled ${feedforward ? 'in' : 'out'})`);
      if (m.scale.length !== (m.feedforward ? inF : outF)) throw bad(`lora.ia3[${i}].scale`, `${m.path} scales ${m.feedforward ? inF : outF} features, not ${m.scale.length}`);
    });
    if (new Set([...lora.modules, ...(lora.ia3 ?? [])].map((m) => m.path)).size !== lora.modules.length + (lora.ia3?.length ?? 0)) throw bad('lora', 'names a module twice');
  };

  const serve = async (request: Exclude<MiddleRequest, { op: 'dropTape' }>, tenant: string, waitMs: number | undefined): Promise<MiddleReply> => {
    const started = performance.now();
    fits(request.shape);
    const tokens = request.shape[0] * request.shape[1];
    switch (request.op) {
      case 'forward': {
        inside(request.blocks);
        rate.add(tokens);
        if (request.lora !== undefined) {
          heldFits(request.lora, request.blocks);
          return { ok: true, worker: id, output: await executor.forwardHeld(request.blocks, request.h, request.shape, tenant, request.lora, waitMs), computeMs: performance.now() - started };
        }
        if (!request.keepTape) return { ok: true, worker: id, output: await executor.forward(request.blocks, request.h, request.shape, tenant, undefined, waitMs), computeMs: performance.now() - started };
        const { output, tape } = await executor.forwardKeepingTape(request.blocks, request.h, request.shape, tenant, undefined, waitMs);
        return { ok: true, worker: id, output, tapeId: keep(tape, request.shape), savedBytes: tape.savedBytes, computeMs: performance.now() - started };
      }
      case 'backward':
        inside(request.blocks);
        rate.add(tokens);
        if (request.lora !== undefined) {
          heldFits(request.lora, request.blocks);
          const { output, loraGrads } = await executor.backwardHeld(request.blocks, request.h, request.g, request.shape, tenant, request.lora, waitMs);
          return { ok: true, worker: id, output, loraGrads, computeMs: performance.now() - started };
        }
        return { ok: true, worker: id, output: await executor.backward(request.blocks, request.h, request.g, request.shape, tenant, undefined, waitMs), computeMs: performance.now() - started };
      case 'backwardFromTape': {
        const held = tapes.get(request.tapeId);
        if (held === undefined) return { ok: false, worker: id, kind: 'tapeLost', message: `tape ${request.tapeId} is not kept by worker ${id}` };
        if (held.shape.some((d, i) => d !== request.shape[i])) {
          throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: 'shape', reason: `[${request.shape.join(', ')}] is not the shape of tape ${request.tapeId}'s forward, [${held.shape.join(', ')}]` });
        }
        tapes.delete(request.tapeId);
        tapeBytes -= held.tape.savedBytes;
        rate.add(tokens);
        try {
          return { ok: true, worker: id, output: await executor.backwardFromTape(held.tape, request.g, request.shape, tenant), computeMs: performance.now() - started };
        } catch (error) {
          if (error instanceof TapeLost) return { ok: false, worker: id, kind: 'tapeLost', message: error.message };
          throw error;
        }
      }
    }
  };

  const spill = new WireSpill(nc);
  // Bodies over max_payload come and go through the object store.
  // A reply after its gateway stopped waiting (the wait the request stated) has no reader: a
  // spilled one would stay in the object store until its TTL. A tape whose forward is not
  // answered is dropped: no backward will name it (the gateway's retry keeps another).
  const respond = async (msg: Msg, reply: MiddleReply, expiresAt?: number): Promise<void> => {
    const unanswered = (): void => {
      if (reply.ok && reply.tapeId !== undefined) drop(reply.tapeId);
    };
    if (msg.reply === undefined || nc.isClosed() || (expiresAt !== undefined && Date.now() > expiresAt)) return unanswered();
    let body: { data: Uint8Array; headers?: MsgHdrs };
    try {
      body = await spill.outgoing(encodeReply(reply));
    } catch (error) {
      unanswered();
      const e = error as ClusterError;
      body = { data: encodeReply({ ok: false, worker: id, kind: 'failed', message: e.message.slice(0, 500), code: e.code }) };
    }
    if (!nc.isClosed()) msg.respond(body.data, { headers: body.headers });
  };

  const handle = async (msg: Msg): Promise<void> => {
    const trace = traceOf(msg.headers);
    let request: MiddleRequest;
    try {
      // h and g, and a held adapter's factors (bounded by maxElements too).
      request = decodeRequest(await spill.incoming(msg, maxElements * 4 * 3 + REQUEST_OVERHEAD_BYTES), maxElements);
    } catch (error) {
      const e = error as ClusterError;
      await respond(msg, { ok: false, worker: id, kind: 'invalid', message: e.message.slice(0, 500), code: e.code });
      return;
    }
    if (request.op === 'dropTape') {
      drop(request.tapeId);
      return;
    }
    const claim = claimOf(msg.headers);
    if (claim !== undefined) nc.publish(claim.to, JSON.stringify({ id: claim.id, worker: id }));
    running++;
    const waitMs = waitOf(msg.headers);
    const expiresAt = waitMs === undefined ? undefined : Date.now() + waitMs;
    serve(request, trace.tenant ?? '', waitMs).then(
      (reply) => reply,
      (error: unknown): MiddleReply => {
        const e = error as Error & { code?: string };
        log.warn({ err: e.message, requestId: trace.requestId, session: trace.session }, 'a middle request failed');
        return { ok: false, worker: id, kind: e instanceof ClusterError ? 'invalid' : 'failed', message: e.message.slice(0, 500), code: e.code };
      },
    ).then((reply) => {
      running--;
      return respond(msg, reply, expiresAt);
    }).catch((error: unknown) => log.error({ err: error }, 'answering a middle request failed'));
  };
  const onMessage = (msg: Msg): void => {
    handle(msg).catch((error: unknown) => log.error({ err: error }, 'handling a middle request failed'));
  };

  const subs: Subscription[] = [
    nc.subscribe(rangeSubject(contentHash, blocks), { queue: `tandem-middle-${rangeName(blocks)}`, callback: (err, msg) => { if (err === null) onMessage(msg); } }),
    nc.subscribe(workerSubject(id), { callback: (err, msg) => { if (err === null) onMessage(msg); } }),
  ];
  const status = (): WorkerStatus => ({
    id, model: modelId, blocks: { ...blocks },
    load: { queued: executor.queued, running, tokensPerSecond: rate.perSecond() },
    lastSeenMs: Date.now(),
  });
  const announce = (extra: Record<string, unknown> = {}): void => {
    if (nc.isClosed()) return;
    nc.publish(ANNOUNCE_SUBJECT, JSON.stringify({ ...status(), contentHash, ...extra }));
  };
  const sweep = (): void => {
    const old = Date.now() - ttlMs;
    for (const [tapeId, held] of tapes) if (held.storedAt < old) drop(tapeId);
  };
  const timer = setInterval(() => {
    announce();
    sweep();
  }, ANNOUNCE_INTERVAL_MS);
  await nc.flush();
  announce();
  log.info({ worker: id, model: modelId, blocks: rangeName(blocks), nats: options.natsUrl }, 'middle worker ready');

  let closed = false;
  return {
    id, contentHash, blocks,
    async close() {
      if (closed) return;
      closed = true;
      clearInterval(timer);
      for (const sub of subs) sub.unsubscribe();
      announce({ leaving: true });
      await nc.drain().catch(() => undefined);
      for (const tapeId of [...tapes.keys()]) drop(tapeId);
      await executor.close();
    },
  };
}
