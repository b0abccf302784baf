import { Command } from 'commander';
import { DEFAULT_ACTIVATION_TTL_MS, DEFAULT_MEMORY_BUDGET_BYTES, startCloudNode } from '../cloud-node/index.ts';
import { numberFlag, requiredFlag } from './flags.ts';
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
  logLevel: string;
}

export const DEFAULT_CLOUD_PORT = 7470;

/** Resolves when the process is asked to stop (SIGINT, SIGTERM). */
function untilSignal(): Promise<void> {
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
    .option('--log-level <level>', 'pino log level (logs go to stderr as JSON lines)', 'info')
    .action(async (flags: CloudFlags) => {
      const modelDir = requiredFlag('--model', flags.model);
      const port = numberFlag('--port', flags.port, { min: 0, max: 65535, integer: true });
      const memoryBudget = numberFlag('--memory-budget', flags.memoryBudget, { min: 0 });
      const ttl = numberFlag('--activation-ttl', flags.activationTtl, { min: 0 });
      const node = await startCloudNode({
        modelDir,
        modelId: flags.modelId,
        stateDir: flags.state,
        host: flags.host,
        port,
        memoryBudgetBytes: Math.round(memoryBudget * 2 ** 20),
        activationTtlMs: Math.round(ttl * 1000),
        backend: flags.backend,
        logLevel: flags.logLevel,
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
