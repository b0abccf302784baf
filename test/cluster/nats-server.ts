// A real nats-server (Debian's) on a free loopback port with JetStream in a temporary store
// directory, for the cluster tests: started, stopped, and started again on the same port and
// store (a restart). It runs with the users and permissions of infra/nats/auth.conf, and the
// passwords are put in this process's environment, where gateways and workers (and the child
// processes the tests start) read them: every cluster test runs as a deployment would.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { natsAuthInclude, spawnFailure } from '../../cloud-node/cluster/launcher.ts';
import { natsPasswordVariable } from '../../cloud-node/cluster/nats-connection.ts';

export const NATS_SERVER = process.env.TANDEM_NATS_SERVER ?? (process.platform === 'linux' ? '/usr/sbin/nats-server' : 'nats-server');

export interface TestNatsServer {
  url: string;
  port: number;
  storeDir: string;
  /** Stops the server (SIGTERM) and waits for its exit. */
  stop(): Promise<void>;
  /** Starts it again on the same port and store directory. */
  start(): Promise<void>;
  /** Stops it and removes the store. */
  close(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

export async function waitReady(child: ChildProcess, port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    let log = '';
    const timer = setTimeout(() => reject(new Error(`nats-server did not start on ${port}:\n${log}`)), 15_000);
    const onData = (chunk: Buffer): void => {
      log += chunk.toString();
      if (log.includes('Server is ready')) {
        clearTimeout(timer);
        child.stderr?.off('data', onData);
        resolve();
      }
    };
    child.stderr?.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nats-server exited with ${code}:\n${log}`));
    });
    child.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(spawnFailure('nats', child.spawnfile, error));
    });
  });
}

/** The passwords of the two NATS users, set in process.env once (children inherit them). */
export function natsPasswords(): { gateway: string; worker: string } {
  for (const role of ['gateway', 'worker'] as const) process.env[natsPasswordVariable(role)] ??= `tandem-${randomBytes(18).toString('hex')}`;
  return { gateway: process.env[natsPasswordVariable('gateway')]!, worker: process.env[natsPasswordVariable('worker')]! };
}

/**
 * `maxPayload` sets the server's max_payload (bytes; its default is 1MB): lower to exercise large tensors, 8MB as infra/nats deploys it.
 * `maxMemoryStore` sets JetStream's memory store (64MB here): lower to fill it.
 */
export async function startNatsServer(options: { maxPayload?: number; maxMemoryStore?: string } = {}): Promise<TestNatsServer> {
  const storeDir = await mkdtemp(join(tmpdir(), 'tandem-nats-'));
  const port = await freePort();
  const config = join(storeDir, 'nats.conf');
  await writeFile(config, [
    `listen: 127.0.0.1:${port}`,
    `jetstream { store_dir: ${JSON.stringify(join(storeDir, 'js'))}, max_memory_store: ${options.maxMemoryStore ?? '64MB'}, max_file_store: 512MB }`,
    options.maxPayload === undefined ? '' : `max_payload: ${options.maxPayload}`,
    natsAuthInclude(config),
  ].join('\n'));
  let child: ChildProcess | undefined;
  const server: TestNatsServer = {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir,
    async start() {
      if (child !== undefined) return;
      natsPasswords();
      const c = spawn(NATS_SERVER, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] });
      child = c;
      c.once('exit', () => { if (child === c) child = undefined; });
      try {
        await waitReady(c, port);
      } catch (error) {
        if (child === c) child = undefined;
        throw error;
      }
      c.stderr?.resume();
    },
    async stop() {
      const c = child;
      if (c === undefined) return;
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await exited;
      child = undefined;
    },
    async close() {
      await server.stop();
      await rm(storeDir, { recursive: true, force: true });
    },
  };
  await server.start();
  return server;
}
