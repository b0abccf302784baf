// A cloud node: fastify (REST under /v1, OpenAPI, /metrics) and socket.io (protocol v1
// envelopes) on one HTTP server, the middle executor over the served model, and the
// state directory (keys and sessions).
import swagger from '@fastify/swagger';
import Fastify from 'fastify';
import type { FastifyBaseLogger, FastifyError, FastifyInstance } from 'fastify';
import { mkdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import { pino } from 'pino';
import type { Logger } from 'pino';
import { initBackend } from '../model/index.ts';
import { DEFAULT_LIMITS, intersectLimits } from '../protocol/index.ts';
import type { CodecPreferences, Limits } from '../protocol/index.ts';
import { ActivationCache } from './activation-cache.ts';
import { ModelSlot } from './context.ts';
import type { CloudContext } from './context.ts';
import { attachDataPlane } from './data-plane.ts';
import { CloudError } from './errors.ts';
import { EmulatorRegistry } from './emulator-registry.ts';
import type { EmulatorBuildSettings } from './emulator-registry.ts';
import { CloudMetrics } from './metrics.ts';
import { MiddleExecutor } from './middle-executor.ts';
import { requireCaller } from './plugins/auth.ts';
import { healthPlugin } from './plugins/health.ts';
import { keysPlugin } from './plugins/keys.ts';
import { metricsPlugin } from './plugins/metrics.ts';
import { emulatorsPlugin } from './plugins/emulators.ts';
import { federationsPlugin } from './plugins/federations.ts';
import { Coordinator } from './federation/index.ts';
import { modelsPlugin } from './plugins/models.ts';
import { sessionsPlugin } from './plugins/sessions.ts';
import { ServedModel } from './served-model.ts';
import { SERVER_BUILD, SessionService } from './session-service.ts';
import { ADMIN_TENANT, KeyStore } from './state/key-store.ts';
import { SessionStore } from './state/session-store.ts';

export const DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024 * 1024;
export const DEFAULT_ACTIVATION_TTL_MS = 10 * 60 * 1000;

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
}

export interface CloudNode {
  /** http://host:port */
  url: string;
  port: number;
  /** The admin key, only when this start created it (first start on an empty state directory). */
  adminKey?: string;
  /** The limits this node offers sessions. */
  limits: Limits;
  close(): Promise<void>;
}

function sendError(app: FastifyInstance, log: Logger): void {
  app.setErrorHandler((error: FastifyError | CloudError | Error, request, reply) => {
    if (error instanceof CloudError) {
      return reply.code(error.status).send({ code: error.code, message: error.message, details: error.details });
    }
    const fastifyError = error as FastifyError;
    if (fastifyError.validation !== undefined || (fastifyError.statusCode !== undefined && fastifyError.statusCode < 500)) {
      const wrapped = new CloudError('TANDEM_REQUEST_INVALID', { reason: fastifyError.message });
      return reply.code(fastifyError.statusCode ?? 400).send({ code: wrapped.code, message: wrapped.message, details: wrapped.details });
    }
    log.error({ err: error, url: request.url }, 'unexpected error in a route');
    const internal = new CloudError('TANDEM_INTERNAL', { reason: 'see the node log' });
    return reply.code(500).send({ code: internal.code, message: internal.message });
  });
  app.setNotFoundHandler((request, reply) => {
    const error = new CloudError('TANDEM_ROUTE_UNKNOWN', { method: request.method, url: request.url.split('?')[0] });
    return reply.code(404).send({ code: error.code, message: error.message });
  });
}

/** Starts a node: listens first (health answers, readiness says loading), then loads the model. */
export async function startCloudNode(options: CloudNodeOptions): Promise<CloudNode> {
  const log = options.logger ?? pino({ name: 'tandem-cloud', level: options.logLevel ?? 'info' }, pino.destination(2));
  const stateDir = resolve(options.stateDir);
  await mkdir(stateDir, { recursive: true });
  const keys = await KeyStore.open(stateDir);
  let adminKey: string | undefined;
  if (!keys.hasAdmin) {
    adminKey = (await keys.create(ADMIN_TENANT, { admin: true })).key;
    log.info({ stateDir }, 'created the admin key (printed once by `tandem cloud`)');
  }
  const sessions = await SessionStore.open(stateDir);
  const limits = intersectLimits(options.limits ?? DEFAULT_LIMITS);
  const metrics = new CloudMetrics();
  metrics.sessionsOpen.set(sessions.openCount);
  const cache = new ActivationCache({
    budgetBytes: options.memoryBudgetBytes ?? DEFAULT_MEMORY_BUDGET_BYTES,
    ttlMs: options.activationTtlMs ?? DEFAULT_ACTIVATION_TTL_MS,
    onEvict: (reason) => metrics.evictions.inc({ reason }),
    onSize: (bytes) => metrics.cacheBytes.set(bytes),
  });
  const model = new ModelSlot();
  const service = new SessionService({ store: sessions, metrics, cache, model: () => model.get(), limits, codecs: options.codecs });
  const ctx: CloudContext = { keys, sessions, service, metrics, model };

  const app = Fastify({ loggerInstance: log as FastifyBaseLogger, bodyLimit: 1024 * 1024 });
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'Tandem cloud node', version: SERVER_BUILD, description: 'REST operator API of a Tandem cloud node. The data plane is socket.io on the same server; see cloud-node/README.md.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'an API key from `tandem keys create`' } } },
    },
  });
  sendError(app, log);
  await app.register(healthPlugin, { prefix: '/v1', ...ctx });
  await app.register(modelsPlugin, { prefix: '/v1', ...ctx });
  await app.register(emulatorsPlugin, { prefix: '/v1', ...ctx, emulators: new EmulatorRegistry(stateDir, options.emulators, (key, err) => log.warn({ bundle: key, err: err.message }, 'a stored emulator bundle does not verify; building it again')), maxAdapterRequestBytes: options.maxAdapterRequestBytes });
  await app.register(sessionsPlugin, { prefix: '/v1', ...ctx });
  await app.register(keysPlugin, { prefix: '/v1', ...ctx });
  const coordinator = await Coordinator.open({ stateDir });
  await app.register(federationsPlugin, { prefix: '/v1', ...ctx, coordinator });
  await app.register(metricsPlugin, ctx);
  await app.register(async (scope) => {
    scope.addHook('onRequest', requireCaller(keys));
    scope.get('/openapi.json', {
      schema: { summary: 'this OpenAPI document', tags: ['operations'], security: [{ bearer: [] }], response: { 200: { type: 'object', additionalProperties: true } } },
    }, async () => app.swagger());
  }, { prefix: '/v1' });

  const io = attachDataPlane({ server: app.server, keys, service, metrics, limits, log: log.child({ plane: 'data' }) });
  const sweep = setInterval(() => cache.sweep(), Math.max(1000, Math.min(60_000, options.activationTtlMs ?? DEFAULT_ACTIVATION_TTL_MS)));
  sweep.unref();

  const close = async (): Promise<void> => {
    clearInterval(sweep);
    coordinator.close();
    io.disconnectSockets(true);
    io.engine.close();
    await app.close();
    cache.clear();
    if (model.ready) model.served().dispose();
  };

  try {
    await app.listen({ host: options.host ?? '127.0.0.1', port: options.port ?? 0 });
    const backend = await initBackend({ backend: options.backend, log: (line) => log.info(line) });
    const served = await ServedModel.load(options.modelDir, options.modelId);
    model.set(served, new MiddleExecutor(served.model));
    log.info({ model: served.id, contentHash: served.contentHash, layers: served.numLayers, backend: backend.name }, 'model loaded; ready');
  } catch (error) {
    await close();
    throw error;
  }
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : (options.port ?? 0);
  const host = options.host ?? '127.0.0.1';
  return { url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`, port, adminKey, limits, close };
}
