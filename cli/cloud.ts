import { Command } from 'commander';
import {
  DEFAULT_ACTIVATION_TTL_MS, DEFAULT_BATCH_WINDOW_MS, DEFAULT_CLOSED_RETENTION_MS, DEFAULT_EMULATOR_MAX_BUNDLES, DEFAULT_EMULATOR_MAX_BYTES, DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_QUOTAS,
  DEFAULT_MAX_BATCH_TOKENS, DEFAULT_SESSION_IDLE_MS, parseBlockRange, startCloudNode, startMiddleWorkerNode,
} from '../cloud-node/index.ts';
import { CliError } from './errors.ts';
import { numberFlag, pemFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { DEFAULT_STATE_DIR } from './keys.ts';

interface CloudFlags {
  model?: string;
  modelId?: string;
  port: string;
  host: string;
  state: string;
  memoryBudget: string;
  activationTtl: string;
  backend?: string;
  engine?: string;
  logLevel: string;
  tlsCert?: string;
  tlsKey?: string;
  quotaSessions: string;
  quotaTokens: string;
  quotaMbPerMinute: string;
  quotaBundles: string;
  quotaAdapters: string;
  quotaRequestsPerMinute: string;
  sessionIdle: string;
  closedRetention: string;
  emulatorsMaxBundles: string;
  emulatorsMaxMb: string;
  batchWindowMs: string;
  maxBatchTokens: string;
  role: string;
  nats?: string;
  blocks?: string;
  workerTimeout: string;
  natsReplicas: string;
}


export const DEFAULT_CLOUD_PORT = 7470;

/** `--nats nats://a:4222,nats://b:4222` → the URLs, each checked. */
export function natsFlag(value: string): string[] {
  const urls = value.split(',').map((u) => u.trim());
  if (urls.length > 16) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--nats', `lists ${urls.length} servers; at most 16`);
  for (const u of urls) {
    let url: URL;
    try {
      url = new URL(u);
    } catch {
      throw new CliError('TANDEM_CLI_FLAG_INVALID', '--nats', `${JSON.stringify(u.slice(0, 80))} is not a URL (nats://host:4222)`);
    }
    if (!['nats:', 'tls:', 'ws:', 'wss:'].includes(url.protocol)) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--nats', `${JSON.stringify(u.slice(0, 80))}: the scheme must be nats, tls, ws or wss`);
  }
  return urls;
}

/** Resolves when the process is asked to stop (SIGINT, SIGTERM). */
export function untilSignal(): Promise<void> {
  return new Promise((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

/** `tandem cloud`: serves a model until stopped. `until` replaces the signal wait (tests). */
export function cloudCommand(io: CommandIo, until: () => Promise<void> = untilSignal): Command {
  return new Command('cloud')
    .description('run a cloud node: REST operator API, socket.io data plane and the middle blocks of a model')
    .option('--model <dir>', 'Hugging Face model folder to serve')
    .option('--model-id <id>', "the model's id for clients (default: the folder's name)")
    .option('--port <p>', 'TCP port (0 picks a free one)', String(DEFAULT_CLOUD_PORT))
    .option('--host <h>', 'address to listen on (0.0.0.0 for every interface)', '127.0.0.1')
    .option('--state <dir>', 'state directory: keys and sessions', DEFAULT_STATE_DIR)
    .option('--memory-budget <mb>', 'MiB of activations kept for backward, all sessions together', String(DEFAULT_MEMORY_BUDGET_BYTES / 2 ** 20))
    .option('--activation-ttl <s>', 'seconds an activation waits for its backward', String(DEFAULT_ACTIVATION_TTL_MS / 1000))
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .option('--engine <name>', "the middle's engine: auto (tfjs on --backend), ort-cpu, ort-cuda (ONNX Runtime), tfjs-node-gpu, tfjs-node, wasm, cpu (default TANDEM_ENGINE)")
    .option('--log-level <level>', 'pino log level (logs go to stderr as JSON lines)', 'info')
    .option('--tls-cert <file>', 'PEM certificate (chain): serve HTTPS and WSS on the port (with --tls-key)')
    .option('--tls-key <file>', 'PEM private key of --tls-cert')
    .option('--quota-sessions <n>', 'sessions a tenant may have open at once', String(DEFAULT_QUOTAS.openSessions))
    .option('--quota-tokens <n>', 'tokens (batch x sequence) a tenant may have computing at once', String(DEFAULT_QUOTAS.tokensInFlight))
    .option('--quota-mb-per-minute <mb>', 'MiB a tenant may send on the data plane per minute', String(DEFAULT_QUOTAS.bytesPerMinute / 2 ** 20))
    .option('--quota-bundles <n>', 'emulator bundles a tenant\'s requests may keep built', String(DEFAULT_QUOTAS.storedBundles))
    .option('--quota-adapters <n>', 'adapters a tenant may have the node hold (evaluate) at once', String(DEFAULT_QUOTAS.storedAdapters))
    .option('--quota-requests-per-minute <n>', 'REST requests per tenant per minute (the admin is exempt)', String(DEFAULT_QUOTAS.requestsPerMinute))
    .option('--session-idle <s>', 'seconds without a request after which an open session expires', String(DEFAULT_SESSION_IDLE_MS / 1000))
    .option('--closed-retention <s>', 'seconds a closed session stays listed before it is pruned', String(DEFAULT_CLOSED_RETENTION_MS / 1000))
    .option('--emulators-max-bundles <n>', 'emulator bundles on disk, all tenants together (least recently used evicted)', String(DEFAULT_EMULATOR_MAX_BUNDLES))
    .option('--batch-window-ms <ms>', 'milliseconds a batch of the middle waits for more sessions\' requests (0: only those already queued)', String(DEFAULT_BATCH_WINDOW_MS))
    .option('--max-batch-tokens <n>', 'tokens (batch x sequence) of one batched middle call at most', String(DEFAULT_MAX_BATCH_TOKENS))
    .option('--role <role>', 'all: one process (default); gateway: REST and socket.io, the middle on the NATS workers; worker: the middle blocks only, for the gateways', 'all')
    .option('--nats <urls>', 'NATS server URL(s), comma-separated (with --role gateway or worker)')
    .option('--blocks <a-b>', 'blocks [A, B) a worker owns (default: the whole model)')
    .option('--worker-timeout <s>', "a gateway's wait for a worker to claim a request before asking the range again", '10')
    .option('--nats-replicas <n>', "replicas of a gateway's JetStream buckets (3 on a three-node NATS cluster)", '1')
    .option('--emulators-max-mb <mb>', 'MiB of emulator bundles on disk, all tenants together', String(DEFAULT_EMULATOR_MAX_BYTES / 2 ** 20))
    .action(async (flags: CloudFlags) => {
      const modelDir = requiredFlag('--model', flags.model);
      const role = flags.role;
      if (role !== 'all' && role !== 'gateway' && role !== 'worker') throw new CliError('TANDEM_CLI_FLAG_INVALID', '--role', `must be all, gateway or worker, got ${JSON.stringify(role.slice(0, 40))}`);
      if (role !== 'all' && (flags.nats === undefined || flags.nats === '')) throw new CliError('TANDEM_CLI_FLAG_MISSING', '--nats', `--role ${role} needs the NATS server's URL`);
      if (role === 'all' && flags.nats !== undefined) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--nats', 'needs --role gateway or worker (--role all is one process, without NATS)');
      if (flags.blocks !== undefined && role !== 'worker') throw new CliError('TANDEM_CLI_FLAG_INVALID', '--blocks', 'is for --role worker');
      const natsUrls = role === 'all' ? [] : natsFlag(flags.nats as string);
      if (role === 'worker') {
        if (flags.blocks !== undefined) {
          try {
            parseBlockRange(flags.blocks);
          } catch (cause) {
            throw new CliError('TANDEM_CLI_FLAG_INVALID', '--blocks', (cause as Error).message);
          }
        }
        // A worker's middle runs on ONNX Runtime (--engine ort-cpu|ort-cuda; TANDEM_THREADS intra-op threads) or on tfjs (--backend).
        if (flags.engine !== undefined && flags.engine !== 'ort-cpu' && flags.engine !== 'ort-cuda') {
          throw new CliError('TANDEM_CLI_FLAG_INVALID', '--engine', `a worker runs ort-cpu or ort-cuda (or tfjs on --backend without --engine), got ${JSON.stringify(flags.engine.slice(0, 40))}`);
        }
        const worker = await startMiddleWorkerNode({
          modelDir, modelId: flags.modelId, natsUrl: natsUrls.join(','), blocks: flags.blocks, backend: flags.backend, engine: flags.engine,
          memoryBudgetBytes: Math.round(numberFlag('--memory-budget', flags.memoryBudget, { min: 0 }) * 2 ** 20),
          tapeTtlMs: Math.round(numberFlag('--activation-ttl', flags.activationTtl, { min: 0 }) * 1000), logLevel: flags.logLevel,
        });
        io.out(`tandem worker ${worker.id} serving blocks ${worker.blocks.start}-${worker.blocks.end} on ${natsUrls.join(',')}`);
        try {
          await until();
        } finally {
          await worker.close();
        }
        return;
      }
      const workerTimeoutMs = Math.round(numberFlag('--worker-timeout', flags.workerTimeout, { min: 0.1, max: 3600 }) * 1000);
      const port = numberFlag('--port', flags.port, { min: 0, max: 65535, integer: true });
      const memoryBudget = numberFlag('--memory-budget', flags.memoryBudget, { min: 0 });
      const ttl = numberFlag('--activation-ttl', flags.activationTtl, { min: 0 });
      const count = (flag: string, value: string): number => numberFlag(flag, value, { min: 1, max: Number.MAX_SAFE_INTEGER, integer: true });
      const quotas = {
        openSessions: count('--quota-sessions', flags.quotaSessions),
        tokensInFlight: count('--quota-tokens', flags.quotaTokens),
        bytesPerMinute: Math.round(numberFlag('--quota-mb-per-minute', flags.quotaMbPerMinute, { min: 1 / 1024, max: 2 ** 32 }) * 2 ** 20),
        storedBundles: count('--quota-bundles', flags.quotaBundles),
        storedAdapters: count('--quota-adapters', flags.quotaAdapters),
        requestsPerMinute: count('--quota-requests-per-minute', flags.quotaRequestsPerMinute),
      };
      const sessions = {
        idleMs: Math.round(numberFlag('--session-idle', flags.sessionIdle, { min: 1, max: 365 * 86400 }) * 1000),
        closedRetentionMs: Math.round(numberFlag('--closed-retention', flags.closedRetention, { min: 0, max: 365 * 86400 }) * 1000),
      };
      const emulatorStorage = {
        maxBundles: count('--emulators-max-bundles', flags.emulatorsMaxBundles),
        maxBytes: Math.round(numberFlag('--emulators-max-mb', flags.emulatorsMaxMb, { min: 1, max: 2 ** 32 }) * 2 ** 20),
      };
      const batching = {
        windowMs: numberFlag('--batch-window-ms', flags.batchWindowMs, { min: 0, max: 10_000 }),
        maxTokens: count('--max-batch-tokens', flags.maxBatchTokens),
      };
      if ((flags.tlsCert === undefined) !== (flags.tlsKey === undefined)) {
        const missing = flags.tlsCert === undefined ? '--tls-cert' : '--tls-key';
        throw new CliError('TANDEM_CLI_FLAG_MISSING', missing, '--tls-cert and --tls-key go together');
      }
      const tls = flags.tlsCert !== undefined && flags.tlsKey !== undefined
        ? { cert: await pemFlag('--tls-cert', flags.tlsCert), key: await pemFlag('--tls-key', flags.tlsKey) }
        : undefined;
      const node = await startCloudNode({
        modelDir,
        modelId: flags.modelId,
        stateDir: flags.state,
        host: flags.host,
        port,
        memoryBudgetBytes: Math.round(memoryBudget * 2 ** 20),
        activationTtlMs: Math.round(ttl * 1000),
        backend: flags.backend,
        engine: flags.engine,
        logLevel: flags.logLevel,
        quotas,
        sessions,
        emulatorStorage,
        batching,
        tls,
        cluster: role === 'gateway' ? { natsUrl: natsUrls.join(','), attemptTimeoutMs: workerTimeoutMs, replicas: numberFlag('--nats-replicas', flags.natsReplicas, { min: 1, max: 5, integer: true }) } : undefined,
      });
      io.out(`tandem cloud listening on ${node.url}`);
      if (node.adminKey !== undefined) io.out(`admin key (shown once, keep it): ${node.adminKey}`);
      try {
        await until();
      } finally {
        await node.close();
      }
    });
}
