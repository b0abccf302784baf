// A cloud node: fastify (REST under /v1, OpenAPI, /metrics) and socket.io (protocol v1
// envelopes) on one HTTP server, the middle executor over the served model, and the
// state directory (keys and sessions).
import rateLimit from '@fastify/rate-limit';
import swagger from '@fastify/swagger';
import Fastify from 'fastify';
import type { FastifyBaseLogger, FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { createServer as createHttpServer } from 'node:http';
import type { IncomingMessage, RequestListener, Server as HttpServer, ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { createSecureContext } from 'node:tls';
import { pino } from 'pino';
import type { Logger } from 'pino';
import type { Server as SocketServer } from 'socket.io';
import { initBackend, parseEngineName } from '../model/index.ts';
import { DEFAULT_LIMITS, intersectLimits } from '../protocol/index.ts';
import type { CodecPreferences, Limits } from '../protocol/index.ts';
import { ActivationCache } from './activation-cache.ts';
import { ModelSlot } from './context.ts';
import { attachDataPlane, errorBodyOf } from './data-plane.ts';
import { CloudError, rawRefusal, resourceErrorOf } from './errors.ts';
import { EmulatorRegistry } from './emulator-registry.ts';
import type { EmulatorBuildSettings, EmulatorStorageLimits } from './emulator-registry.ts';
import type { ClusterStatusSource } from './cluster-status.ts';
import { LocalClusterStatus } from './local-cluster-status.ts';
import { CloudMetrics } from './metrics.ts';
import { MiddleExecutor } from './middle-executor.ts';
import { HeldAdapters } from './held-adapters.ts';
import { HeldAdapterStore } from './state/held-adapter-store.ts';
import { JetStreamHeldAdapterStore } from './state/jetstream-held-adapter-store.ts';
import type { MiddleRunner } from './middle-runner.ts';
import { ClusterExecutor, connectNats } from './cluster/index.ts';
import type { HopStats } from './cluster/index.ts';
import { authPlugin } from './plugins/auth.ts';
import { clusterPlugin } from './plugins/cluster.ts';
import { dashboardPlugin } from './plugins/dashboard.ts';
import { lossesPlugin } from './plugins/losses.ts';
import { healthPlugin } from './plugins/health.ts';
import { keysPlugin } from './plugins/keys.ts';
import { metricsPlugin } from './plugins/metrics.ts';
import { emulatorsPlugin } from './plugins/emulators.ts';
import { federationsPlugin } from './plugins/federations.ts';
import { Coordinator, JetStreamFederationStore } from './federation/index.ts';
import { modelsPlugin } from './plugins/models.ts';
import { sessionsPlugin } from './plugins/sessions.ts';
import { QuotaLedger, quotaExceeded } from './quotas.ts';
import type { TenantQuotas } from './quotas.ts';
import { ServedModel } from './served-model.ts';
import { SERVER_BUILD, SessionService } from './session-service.ts';
import type { SessionLifetimes } from './session-service.ts';
import { ensureStateDir, tidyStateDir } from './state/json-file.ts';
import { ADMIN_TENANT, KEYS_FILE, KeyStore } from './state/key-store.ts';
import type { KeyRecord } from './state/key-store.ts';
import { SessionStore } from './state/session-store.ts';
import { TimeSeries } from './time-series.ts';
import { TrainingActivity } from './training-activity.ts';
import { adaptersPlugin } from './plugins/adapters.ts';
import { modelsFor, openAiPlugin } from './plugins/openai.ts';
import { AdapterRegistry } from './serving/adapter-registry.ts';
import { Serving } from './serving/serving.ts';
import type { ServingLimits } from './serving/serving.ts';
import { ServingMetrics } from './serving/serving-metrics.ts';
import { AdapterEvaluator } from './adapter-evaluator.ts';
import type { AdapterEvaluationLimits } from './adapter-evaluator.ts';
import { SplitInference } from './serving/split-inference.ts';
import type { SplitInferenceLimits } from './serving/split-inference.ts';
import type { SessionRecords } from './state/session-records.ts';
import type { KeyRecords } from './state/key-records.ts';
import { JetStreamKeyStore } from './state/jetstream-key-store.ts';
import { JetStreamQuotaUsage } from './state/jetstream-quota-usage.ts';
import { JetStreamSessionStore } from './state/jetstream-session-store.ts';
import { JetStreamFileMirror } from './state/jetstream-file-mirror.ts';

/** The event a socket gets, with `{code, message}`, just before the node disconnects it (a revoked key). */
export const DISCONNECT_REASON_EVENT = 'tandem:disconnect';

export const DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024 * 1024;
export const DEFAULT_ACTIVATION_TTL_MS = 10 * 60 * 1000;
/** The state directory's folders a gateway shares through the object store: emulator bundles, served adapters. */
const MIRRORED_FOLDERS = ['emulators', 'serving/adapters'] as const;
/** How long a closing gateway waits for its NATS connection to drain before closing it. */
const DRAIN_TIMEOUT_MS = 5000;

/** The tfjs backend behind each tfjs engine name. */
const TFJS_BACKEND_OF: Partial<Record<string, string>> = {
  'tfjs-node-gpu': 'tensorflow-gpu',
  'tfjs-node': 'tensorflow',
  wasm: 'wasm',
  cpu: 'cpu',
};

export interface CloudNodeOptions {
  /** Hugging Face model folder to serve. */
  modelDir: string;
  /** The model's id on the wire; the folder's base name by default. */
  modelId?: string;
  /** Keys and sessions live here; created when missing. */
  stateDir: string;
  host?: string;
  /** 0 picks a free port. */
  port?: number;
  /** Bytes of activations kept for backward, all sessions together. */
  memoryBudgetBytes?: number;
  /** How long an activation is kept waiting for its backward. */
  activationTtlMs?: number;
  /** Compute backend (auto, tensorflow-gpu, tensorflow, wasm, cpu). */
  backend?: string;
  /**
   * The middle's engine (model/engine's names; TANDEM_ENGINE when unset): ort-cpu or ort-cuda
   * run the compute workers' middle on ONNX Runtime; a tfjs engine names the backend; unset
   * or auto keeps `backend`'s choice (tfjs).
   */
  engine?: string;
  /** The node's own limits; a session gets the stricter of these and the edge's. */
  limits?: Partial<Limits>;
  /** Codecs accepted per direction (all by default); the edge's order of preference picks among them. */
  codecs?: CodecPreferences;
  /** A pino logger; by default one writing JSON lines to stderr at `logLevel`. */
  logger?: Logger;
  logLevel?: string;
  /** How emulator bundles are built on request (distillation data and steps, fidelity data). */
  emulators?: EmulatorBuildSettings;
  /** Largest POST /v1/models/:id/adapters/evaluate body (64 MiB). */
  maxAdapterRequestBytes?: number;
  /** A multipart upload (adapters, evaluations) that sends nothing for this long is dropped and its hold freed (FORM_IDLE_TIMEOUT_MS, 30 s). */
  formIdleTimeoutMs?: number;
  /** Adapter evaluation (its worker thread): evaluations waiting, tokens and time of one, the idle worker's stop. */
  adapterEvaluation?: Partial<AdapterEvaluationLimits>;
  /** Every tenant's quotas (DEFAULT_QUOTAS for what is not given). */
  quotas?: Partial<TenantQuotas>;
  /** Quotas of particular tenants, over `quotas`. */
  tenantQuotas?: Readonly<Record<string, Partial<TenantQuotas>>>;
  /** Idle expiry and pruning of closed sessions. */
  sessions?: Partial<SessionLifetimes>;
  /** How often expiry and pruning run (default: a quarter of the idle time, between 1 and 60 s). */
  sweepIntervalMs?: number;
  /** Disk taken by emulator bundles, all tenants together (per tenant: quotas.storedBundles). */
  emulatorStorage?: Partial<Omit<EmulatorStorageLimits, 'perTenant'>>;
  /** PEM certificate (chain) and private key: the node serves HTTPS and WSS on its port. */
  tls?: { cert: string | Buffer; key: string | Buffer };
  /** batch x sequence of one micro-batch, per Forward or Backward frame (16384). */
  maxMicrobatchTokens?: number;
  /** Longest sequence a session may send; the model's context by default (and at most). */
  maxSequenceLength?: number;
  /** Replies kept for retries per session (64); they count in the memory budget. */
  maxRepliesPerSession?: number;
  /** Bytes all incomplete chunked requests may hold together (512 MiB). */
  reassemblyBudgetBytes?: number;
  /** A chunked request with no chunk for this long is dropped (30 s). */
  chunkStreamTimeoutMs?: number;
  /** Compute workers (threads), each with the model loaded once (1). */
  computeWorkers?: number;
  /**
   * The middle's batching across sessions (middle-executor.ts): how long a batch's oldest
   * request waits for others (`windowMs`, 0: what is queued when a worker frees), tokens per batch (`maxTokens`, 512), requests a
   * tenant puts in per round (`tenantWeights`, 1 each), a tenant's tokens computing at once
   * (`tenantTokensInFlight`, unbounded; requests beyond wait, unlike quotas.tokensInFlight's 429).
   */
  batching?: { windowMs?: number; maxTokens?: number; tenantWeights?: Record<string, number>; tenantTokensInFlight?: number };
  /** Where GET /v1/cluster and /dashboard read the workers from: this process by default (a NATS gateway gives the cluster's). */
  clusterStatus?: ClusterStatusSource;
  /** The operator view's time series: a point every `intervalMs` (1000), the last `points` (300) kept. */
  series?: { intervalMs?: number; points?: number };
  /** Adapter serving (/v1/completions, /v1/chat/completions, /v1/adapters): KV budget, batch, resident adapters, upload size. */
  serving?: Partial<ServingLimits>;
  /** Split inference: the middle KV cache bytes per session, per tenant and all sessions together. */
  splitInference?: Partial<SplitInferenceLimits>;
  /** A gateway of a NATS cluster: the middle runs on the cluster's workers (cluster/), not here. */
  cluster?: { natsUrl: string; attemptTimeoutMs?: number; requestTimeoutMs?: number; replicas?: number };
}

/** The node's compute workers, for operations (and the tests and the soak bench). */
export interface ComputeControl {
  readonly workers: number;
  /** Worker restarts since start. */
  readonly restarts: number;
  readonly ready: boolean;
  /** What the workers compute with: a tfjs backend's name, or ort-cpu / ort-cuda. */
  readonly backend: string;
  /** Ends a worker as a crash would; it is restarted, /v1/ready saying 503 meanwhile. */
  terminateWorker(index: number): Promise<void>;
  /** Ends split inference's worker as a crash would (false when none runs); the next InferStep starts one. */
  terminateSplitInference(): Promise<boolean>;
}

export interface CloudNode {
  /** http://host:port, or https:// with `tls` */
  url: string;
  port: number;
  /** The admin key, only when this start created it (first start on an empty state directory). */
  adminKey?: string;
  /** The limits this node offers sessions. */
  limits: Limits;
  compute: ComputeControl;
  /** A gateway's cluster: the workers that announce themselves, and the NATS hop's cost. */
  cluster?: { status: ClusterStatusSource; hop(): HopStats };
  close(): Promise<void>;
}

function sendError(app: FastifyInstance, log: Logger): void {
  app.setErrorHandler((error: FastifyError | CloudError | Error, request, reply) => {
    if (error instanceof CloudError) {
      return reply.code(error.status).send({ code: error.code, message: error.describe(), details: error.details });
    }
    const fastifyError = error as FastifyError;
    if (fastifyError.validation !== undefined || (fastifyError.statusCode !== undefined && fastifyError.statusCode < 500)) {
      const wrapped = new CloudError('TANDEM_REQUEST_INVALID', { reason: fastifyError.message });
      return reply.code(fastifyError.statusCode ?? 400).send({ code: wrapped.code, message: wrapped.describe(), details: wrapped.details });
    }
    const resource = resourceErrorOf(error, 'memory');
    if (resource !== undefined) {
      log.warn({ err: error, url: request.url }, 'a request ran out of a resource');
      return reply.code(resource.status).send({ code: resource.code, message: resource.describe(), details: resource.details });
    }
    log.error({ err: error, url: request.url }, 'unexpected error in a route');
    const internal = new CloudError('TANDEM_INTERNAL', { reason: 'see the node log' });
    return reply.code(500).send({ code: internal.code, message: internal.describe() });
  });
  app.setNotFoundHandler((request, reply) => {
    const error = new CloudError('TANDEM_ROUTE_UNKNOWN', { method: request.method, url: request.url.split('?')[0] });
    return reply.code(404).send({ code: error.code, message: error.describe() });
  });
}

/**
 * What HTTP itself refuses before a route runs (headers or URL over Node's 16 KiB, an unknown
 * method, a malformed chunked body) gets the same typed body as everything else.
 */
function answerClientError(error: Error & { code?: string }, socket: Duplex): void {
  if (!socket.writable) return;
  const status = error.code === 'HPE_HEADER_OVERFLOW' ? 431 : error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
  const reason = status === 431 ? 'the request line and headers are over the server\'s limit of 16 KiB' : status === 408 ? 'the request did not arrive in time' : `HTTP could not parse the request (${error.code ?? 'malformed'})`;
  socket.end(rawRefusal(status, reason));
}

/** An error of fastify's router (a URL that does not decode, a parameter over its length): the typed body too. */
function answerFrameworkError(error: FastifyError, _request: FastifyRequest, reply: FastifyReply): void {
  const wrapped = new CloudError('TANDEM_REQUEST_INVALID', { reason: error.message });
  void reply.code(error.statusCode !== undefined && error.statusCode >= 400 && error.statusCode < 500 ? error.statusCode : 400).send({ code: wrapped.code, message: wrapped.describe(), details: wrapped.details });
}

/** An `Expect` other than 100-continue, which Node answers with an empty 417 by default. */
function answerExpectation(request: IncomingMessage, response: ServerResponse): void {
  const wrapped = new CloudError('TANDEM_REQUEST_INVALID', { reason: `the server meets no expectation but 100-continue, got Expect: ${JSON.stringify(String(request.headers.expect).slice(0, 64))}` });
  const body = JSON.stringify({ code: wrapped.code, message: wrapped.describe(), details: wrapped.details });
  response.writeHead(417, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), connection: 'close' }).end(body);
}

/** The HTTP(S) server fastify runs on; socket.io attaches to the same one. */
function serverFactory(tls: CloudNodeOptions['tls']): (handler: RequestListener) => HttpServer {
  const withExpectation = (server: HttpServer): HttpServer => server.on('checkExpectation', answerExpectation);
  if (tls === undefined) return (handler) => withExpectation(createHttpServer(handler));
  try {
    createSecureContext({ cert: tls.cert, key: tls.key });
  } catch (cause) {
    throw new CloudError('TANDEM_TLS_INVALID', { field: 'certificate or key', reason: (cause as Error).message }, { cause });
  }
  // An https.Server is an http.Server to fastify and socket.io (same request/upgrade events).
  return (handler) => withExpectation(createHttpsServer({ cert: tls.cert, key: tls.key }, handler) as unknown as HttpServer);
}

/** Tells every socket authenticated with `record` why, then disconnects it. */
function disconnectRevoked(io: SocketServer, record: KeyRecord, log: Logger): void {
  const error = new CloudError('TANDEM_AUTH_KEY_REVOKED', { keyId: record.id, revokedAt: record.revokedAt ?? '' });
  const body = errorBodyOf(error, log);
  for (const socket of io.sockets.sockets.values()) {
    if ((socket.data as { caller?: { keyId: string } }).caller?.keyId !== record.id) continue;
    socket.emit(DISCONNECT_REASON_EVENT, { code: body.code, message: body.message });
    socket.disconnect(true);
    log.info({ socket: socket.id, key: record.id }, 'disconnected a socket of a revoked key');
  }
}

/** Starts a node: listens first (health answers, readiness says loading), then loads the model. */
export async function startCloudNode(options: CloudNodeOptions): Promise<CloudNode> {
  // What a start that fails has opened, closed newest first: a half-started gateway must not
  // keep the process alive through its NATS connection or a JetStream watch. Once the node is
  // whole, its own close is the one step.
  const undo: Array<() => unknown> = [];
  try {
    return await assembleCloudNode(options, undo);
  } catch (error) {
    for (const step of undo.reverse()) await Promise.resolve().then(step).catch(() => undefined);
    throw error;
  }
}

async function assembleCloudNode(options: CloudNodeOptions, undo: Array<() => unknown>): Promise<CloudNode> {
  const log = options.logger ?? pino({ name: 'tandem-cloud', level: options.logLevel ?? 'info' }, pino.destination(2));
  const quotas = new QuotaLedger(options.quotas, options.tenantQuotas);
  const createServer = serverFactory(options.tls);
  const stateDir = resolve(options.stateDir);
  await ensureStateDir(stateDir);
  const stale = await tidyStateDir(stateDir, [KEYS_FILE]);
  if (stale.length > 0) log.warn({ removed: stale.length }, 'removed temporary files left by an earlier process');
  // A gateway's keys and sessions are in JetStream, shared with the other gateways.
  const nc = options.cluster === undefined ? undefined : await connectNats(options.cluster.natsUrl, `tandem-gateway-${process.pid}`, 'gateway');
  if (nc !== undefined) undo.push(() => (nc.isClosed() ? undefined : nc.close()));
  const onInvalid = (key: string): void => log.warn({ key }, 'a JetStream state entry is malformed; skipped');
  const onWatch = (bucket: string, state: 'lost' | 'restored', reason?: string): void => {
    if (state === 'lost') log.error({ bucket, reason }, 'the watch of a JetStream state bucket ended: other gateways\' changes are not seen until it is restored');
    else log.info({ bucket }, 'the watch of a JetStream state bucket is restored (bucket reloaded)');
  };
  const keys: KeyRecords = nc === undefined ? await KeyStore.open(stateDir) : await JetStreamKeyStore.open(nc, { replicas: options.cluster?.replicas, onInvalid, onWatch });
  if (keys instanceof JetStreamKeyStore) undo.push(() => keys.close());
  let adminKey: string | undefined;
  if (!keys.hasAdmin) {
    adminKey = (await keys.create(ADMIN_TENANT, { admin: true })).key;
    log.info({ stateDir }, 'created the admin key (printed once by `tandem cloud`)');
  }
  const sessions: SessionRecords = nc === undefined ? await SessionStore.open(stateDir) : await JetStreamSessionStore.open(nc, { replicas: options.cluster?.replicas, onInvalid, onWatch });
  if (sessions instanceof JetStreamSessionStore) undo.push(() => sessions.close());
  // The gateways count each other's tokens in flight and bytes per minute against a tenant's quotas.
  const quotaUsage = nc === undefined ? undefined : await JetStreamQuotaUsage.open(nc, quotas, { replicas: options.cluster?.replicas, onInvalid, onWatch });
  if (quotaUsage !== undefined) undo.push(() => quotaUsage.close());
  const limits = intersectLimits(options.limits ?? DEFAULT_LIMITS);
  const metrics = new CloudMetrics();
  metrics.sessionsOpen.set(sessions.openCount);
  const cache = new ActivationCache({
    budgetBytes: options.memoryBudgetBytes ?? DEFAULT_MEMORY_BUDGET_BYTES,
    ttlMs: options.activationTtlMs ?? DEFAULT_ACTIVATION_TTL_MS,
    onEvict: (reason) => metrics.evictions.inc({ reason }),
    onSize: (activationBytes, replyBytes) => {
      metrics.cacheBytes.set(activationBytes);
      metrics.replyBytes.set(replyBytes);
    },
    maxRepliesPerSession: options.maxRepliesPerSession,
  });
  const model = new ModelSlot();
  const servingMetrics = new ServingMetrics(metrics.registry);
  const inference = new SplitInference(options.splitInference, {
    onBytes: (bytes) => servingMetrics.splitKvCacheBytes.set(bytes),
    onStep: (outcome) => servingMetrics.splitSteps.inc({ outcome }),
    onWorkerStopped: () => servingMetrics.splitWorkerRestarts.inc(),
  });
  const evaluator = new AdapterEvaluator(options.adapterEvaluation, {
    onWorkerStopped: (reason) => {
      metrics.evaluationWorkerStops.inc();
      log.warn({ reason }, 'the adapter-evaluation worker stopped');
    },
  });
  // The operator's view: trained tokens and loss curves per session, the node's series, the workers.
  const activity = new TrainingActivity();
  const series = new TimeSeries({ metrics, trainedTokens: () => activity.trainedTokens, ...options.series });
  // A gateway reports the workers that announce themselves on NATS; one process, itself.
  const local = new LocalClusterStatus({ model, tokensPerSecond: () => series.recentTokensPerSecond() });
  const workers: ClusterStatusSource = options.clusterStatus ?? { workers: () => (executor instanceof ClusterExecutor ? executor.directory : local).workers() };
  // Held middle adapters are checkpointed in the embedded state folder, or in JetStream for a cluster's gateways (any of them may serve the session's next step).
  const held = await HeldAdapters.open(nc === undefined ? await HeldAdapterStore.open(stateDir) : await JetStreamHeldAdapterStore.open(nc, { replicas: options.cluster?.replicas }), metrics);
  const service = new SessionService({ store: sessions, metrics, cache, model: () => model.get(), limits, codecs: options.codecs, quotas, lifetimes: options.sessions, inference, held,
    onComputed: (computed) => activity.record(computed),
    shapeLimits: { maxMicrobatchTokens: options.maxMicrobatchTokens, maxSequenceLength: options.maxSequenceLength },
  });
  // A gateway's adapters and emulator bundles are in the cluster's object store; its state
  // directory is the copy its registries read, restored from there first.
  const files = nc === undefined ? undefined : await JetStreamFileMirror.open(nc, stateDir, { replicas: options.cluster?.replicas });
  let stopWatchingFiles = (): void => undefined;
  undo.push(() => stopWatchingFiles());
  if (files !== undefined) {
    for (const folder of MIRRORED_FOLDERS) await files.restore(folder, (name, reason) => log.warn({ name, reason }, 'a stored file in the object store is skipped'));
  }
  const emulators = new EmulatorRegistry(
    stateDir, options.emulators,
    (key, err) => log.warn({ bundle: key, err: err.message }, 'a stored emulator bundle does not verify; building it again'),
    { ...options.emulatorStorage, perTenant: (tenant) => quotas.of(tenant).storedBundles },
  );
  await emulators.open();
  const adapters = await AdapterRegistry.open(stateDir);
  if (files !== undefined) {
    emulators.onStored((_key, dir) => files.publish(dir));
    emulators.onEvicted((_key, dir) => files.remove(dir));
    adapters.onAdded((_record, dir) => files.publish(dir));
    adapters.onRemoved((record) => files.remove(adapters.dirOf(record)));
    // What other gateways upload or delete while this one runs: serving/adapters/<tenant>/<name>/record.json is stored last.
    stopWatchingFiles = await files.watch('serving/adapters', {
      onFile: async (name) => {
        const [, , tenant, adapter, file] = name.split('/');
        if (file === 'record.json') await adapters.adopt(tenant, adapter);
      },
      onDeleted: async (name) => {
        const [, , tenant, adapter, file] = name.split('/');
        if (file === 'record.json') await adapters.forget(tenant, adapter);
      },
      onError: (err) => log.warn({ err: err.message }, 'following the object store failed for one file'),
    });
  }
  const serving = new Serving(adapters, servingMetrics, options.serving);

  const app = Fastify({ loggerInstance: log as FastifyBaseLogger, bodyLimit: 1024 * 1024, serverFactory: createServer, clientErrorHandler: answerClientError, frameworkErrors: answerFrameworkError });
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'Tandem cloud node', version: SERVER_BUILD, description: 'REST operator API of a Tandem cloud node. The data plane is socket.io on the same server; see cloud-node/README.md.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'an API key from `tandem keys create`' } } },
    },
  });
  sendError(app, log);
  await app.register(healthPlugin, { prefix: '/v1', model });
  await app.register(metricsPlugin, { metrics });
  await app.register(dashboardPlugin);
  // A gateway's federations and rounds are in JetStream too, shared with the other gateways.
  const federations = nc === undefined ? undefined : await JetStreamFederationStore.open(nc, { replicas: options.cluster?.replicas, onInvalid });
  if (federations !== undefined) undo.push(() => federations.close());
  const coordinator = await Coordinator.open(federations === undefined ? { stateDir } : { store: federations });
  // Everything else needs a key: one scope, the auth plugin once, then the per-tenant rate limit.
  await app.register(async (scope) => {
    await scope.register(authPlugin, { keys });
    await scope.register(rateLimit, {
      // A route-level onRequest hook: it runs after the scope's auth hook, so the caller is known.
      keyGenerator: (request) => request.caller.tenant,
      max: (request) => quotas.of(request.caller.tenant).requestsPerMinute,
      timeWindow: 60_000,
      allowList: (request) => request.caller.admin,
      errorResponseBuilder: (request, context) => quotaExceeded(request.caller.tenant, 'requestsPerMinute', Number(context.max), `retry in ${context.after}`),
    });
    await scope.register(modelsPlugin, { model, generationModels: (tenant) => modelsFor(serving, tenant) });
    await scope.register(adaptersPlugin, { serving, quotas, formIdleTimeoutMs: options.formIdleTimeoutMs });
    await scope.register(openAiPlugin, { serving });
    await scope.register(emulatorsPlugin, { model, emulators, quotas, evaluator, maxAdapterRequestBytes: options.maxAdapterRequestBytes, formIdleTimeoutMs: options.formIdleTimeoutMs });
    await scope.register(sessionsPlugin, { sessions, service });
    await scope.register(keysPlugin, { keys });
    await scope.register(federationsPlugin, { coordinator });
    await scope.register(clusterPlugin, { model, workers, sessions, activity, series, coordinator });
    await scope.register(lossesPlugin, { sessions, activity });
    scope.get('/openapi.json', {
      schema: { summary: 'this OpenAPI document', tags: ['operations'], security: [{ bearer: [] }], response: { 200: { type: 'object', additionalProperties: true } } },
    }, async () => app.swagger());
  }, { prefix: '/v1' });

  const io = attachDataPlane({ server: app.server, keys, service, metrics, limits, quotas, log: log.child({ plane: 'data' }),
    reassemblyBudgetBytes: options.reassemblyBudgetBytes, chunkStreamTimeoutMs: options.chunkStreamTimeoutMs,
  });
  keys.onRevoked((record) => disconnectRevoked(io, record, log));
  const sweep = setInterval(() => cache.sweep(), Math.max(1000, Math.min(60_000, options.activationTtlMs ?? DEFAULT_ACTIVATION_TTL_MS)));
  sweep.unref();
  let sweeping = false;
  const sessionSweep = setInterval(() => {
    if (sweeping) return;
    sweeping = true;
    service.sweep().then(
      ({ expired, pruned }) => {
        if (expired + pruned > 0) log.info({ expired, pruned }, 'expired idle sessions and pruned closed ones');
        const known = new Set([...sessions.all()].map((s) => s.id));
        activity.retain((id) => known.has(id));
      },
      (err: unknown) => log.error({ err }, 'the session sweep failed'),
    ).finally(() => { sweeping = false; });
    // A key revoked by another process (`tandem keys revoke`) reaches open sockets here.
    keys.reloadIfChanged().catch((err: unknown) => log.error({ err }, 'reading the keys file failed'));
  }, options.sweepIntervalMs ?? Math.max(1000, Math.min(60_000, service.lifetimes.idleMs / 4)));
  sessionSweep.unref();
  series.start();

  let executor: MiddleRunner | undefined;
  const close = async (): Promise<void> => {
    clearInterval(sweep);
    clearInterval(sessionSweep);
    series.stop();
    coordinator.close();
    io.disconnectSockets(true);
    io.engine.close();
    // A build's request would hold app.close() until the build ends: builds end first.
    await emulators.close();
    await app.close();
    cache.clear();
    serving.close();
    await inference.clear();
    await evaluator.close();
    await executor?.close();
    if (keys instanceof JetStreamKeyStore) keys.close();
    if (sessions instanceof JetStreamSessionStore) sessions.close();
    held.close();
    // Its reports are deleted: the other gateways stop counting them at once (not STALE_MS later).
    await quotaUsage?.close().catch(() => undefined);
    stopWatchingFiles();
    // Its calls in flight finish before the drain (see JetStreamFileMirror.close).
    await files?.close();
    if (nc !== undefined) {
      // A drain waits for every subscription, JetStream consumers included: a stuck one must not hold the node open.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([nc.drain().catch(() => undefined), new Promise((resolve) => { timer = setTimeout(resolve, DRAIN_TIMEOUT_MS); })]);
      clearTimeout(timer);
      if (!nc.isClosed()) await nc.close().catch(() => undefined);
    }
    if (model.loaded) model.served().dispose();
  };
  undo.splice(0, undo.length, close);

  // The node listens before the model loads: health answers, readiness says loading.
  const engine = parseEngineName(options.engine ?? process.env.TANDEM_ENGINE, options.engine !== undefined ? '--engine' : 'TANDEM_ENGINE');
  const ort = engine === 'ort-cpu' || engine === 'ort-cuda' ? engine : undefined;
  const tfjsBackend = engine === undefined || ort !== undefined ? options.backend : TFJS_BACKEND_OF[engine];
  await app.listen({ host: options.host ?? '127.0.0.1', port: options.port ?? 0 });
  const backend = await initBackend({ backend: tfjsBackend, log: (line) => log.info(line) });
  const served = await ServedModel.load(options.modelDir, options.modelId);
  // Split inference computes in a worker thread of its own: on ONNX Runtime with the middle, else on this thread's backend where it loads there.
  inference.useCompute({ backends: [...new Set([backend.name, 'wasm', 'cpu'])], engine: ort });
  evaluator.useCompute({ backends: [...new Set([backend.name, 'wasm', 'cpu'])] });
  emulators.useBackends([backend.name]);
  // The workers use the backend this thread picked, so that every thread computes alike;
  // a native backend that cannot load in a worker thread falls back to wasm, then cpu.
  const computeLog = log.child({ plane: 'compute' });
  // On ORT the engine asked for must start (no fallback): a typed error otherwise.
  const candidates = ort !== undefined ? [backend.name] : [...new Set([backend.name, 'wasm', 'cpu'])];
  if (options.cluster !== undefined) {
    executor = await ClusterExecutor.connect({ ...options.cluster, contentHash: served.contentHash, log: computeLog }, nc);
  }
  for (const name of options.cluster === undefined ? candidates : []) {
    try {
      executor = await MiddleExecutor.start({
        modelDir: served.dir, backend: name, engine: ort, workers: options.computeWorkers, log: computeLog,
        onRestart: () => metrics.computeRestarts.inc(),
        onReady: (ready) => metrics.computeReady.set(ready ? 1 : 0),
        batchWindowMs: options.batching?.windowMs, maxBatchTokens: options.batching?.maxTokens,
        tenantWeights: options.batching?.tenantWeights, tenantTokensInFlight: options.batching?.tenantTokensInFlight,
        onBatch: (batch) => metrics.batch(batch),
      });
      break;
    } catch (error) {
      if (name === candidates.at(-1)) throw error;
      computeLog.warn({ backend: name, err: error instanceof Error ? error.message : String(error) }, 'compute workers could not start on this backend; trying the next');
    }
  }
  if (executor === undefined) throw new CloudError('TANDEM_COMPUTE_FAILED', { reason: 'no compute worker could start' });
  metrics.computeReady.set(1);
  await serving.start(served, ort);
  model.set(served, executor);
  log.info({ model: served.id, contentHash: served.contentHash, layers: served.numLayers, backend: backend.name, computeWorkers: executor.workers, computeBackend: executor.backend, tls: options.tls !== undefined }, 'model loaded; ready');
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : (options.port ?? 0);
  const host = options.host ?? '127.0.0.1';
  const running = executor as MiddleRunner;
  const compute: ComputeControl = {
    get workers() { return running.workers; },
    get backend() { return running.backend; },
    get restarts() { return running.restarts; },
    get ready() { return running.ready; },
    terminateWorker: (index) => running.terminateWorker(index),
    terminateSplitInference: () => inference.terminateWorker(),
  };
  const scheme = options.tls === undefined ? 'http' : 'https';
  const cluster = running instanceof ClusterExecutor ? { status: running.directory, hop: () => running.hop } : undefined;
  return { url: `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}`, port, adminKey, limits, compute, cluster, close };
}
