// `tandem cluster up`: a whole cluster on one machine — a nats-server with JetStream in a
// store directory, N worker processes spread over the ranges, and a gateway — stopped
// together (SIGTERM to each, then the server) when the launcher is asked to stop. The
// nats-server listens on loopback only, with the users of infra/nats/auth.conf and passwords
// made for this launch: a worker gets only the worker's.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';
import type { BlockRange } from '../middle-runner.ts';
import { rangeName } from './block-ranges.ts';
import { natsPasswordVariable } from './nats-connection.ts';
import { ClusterError } from './errors.ts';
import { RECOMMENDED_MAX_PAYLOAD } from './wire-spill.ts';

export const DEFAULT_NATS_SERVER = '/usr/sbin/nats-server';
/** Who may do what on NATS: the file every configuration in infra/nats includes. */
export const NATS_AUTH_CONF = join(import.meta.dirname, '..', '..', 'infra', 'nats', 'auth.conf');

/** The include line of auth.conf for a configuration at `configFile` (nats-server reads includes relative to the including file). */
export function natsAuthInclude(configFile: string): string {
  return `include ${JSON.stringify(relative(dirname(configFile), NATS_AUTH_CONF))}`;
}
/** What the launcher keeps of a child's output (the tail), for the error when it fails to start. */
const KEPT_OUTPUT_CHARS = 64 * 1024;

export interface ClusterLaunchOptions {
  modelDir: string;
  workers: number;
  /** Block ranges; workers are spread over them in turn (each range gets at least one). The whole model when empty. */
  ranges: BlockRange[];
  stateDir: string;
  natsPort: number;
  gatewayPort: number;
  /** Where the gateway listens (nats-server listens on 127.0.0.1 whatever this is). */
  host?: string;
  natsServer?: string;
  backend?: string;
  /** The `tandem` entry (bin/tandem.js). */
  bin: string;
  /** Lines of the processes' stdout, prefixed by their name. */
  onLine?: (line: string) => void;
}

export interface LaunchedCluster {
  natsUrl: string;
  gatewayUrl: string;
  /** The admin key, when this launch's gateway created it. */
  adminKey?: string;
  stop(): Promise<void>;
}

interface Child {
  name: string;
  process: ChildProcess;
  /** Everything it wrote so far. */
  text?: string;
}

function waitFor(child: Child, pattern: RegExp, stream: 'stdout' | 'stderr', timeoutMs: number, onLine?: (line: string) => void): Promise<string> {
  return new Promise((resolveLine, reject) => {
    let text = '';
    const keep = (): void => {
      if (text.length > KEPT_OUTPUT_CHARS) text = text.slice(-KEPT_OUTPUT_CHARS / 2);
      child.text = text;
    };
    const timer = setTimeout(() => reject(new Error(`${child.name} did not start within ${timeoutMs} ms:\n${text.slice(-2000)}`)), timeoutMs);
    const source = child.process[stream];
    const other = child.process[stream === 'stdout' ? 'stderr' : 'stdout'];
    other?.on('data', (c: Buffer) => { text += c.toString(); keep(); });
    source?.on('data', (c: Buffer) => {
      const chunk = c.toString();
      text += chunk;
      keep();
      for (const line of chunk.split('\n')) if (line !== '' && stream === 'stdout') onLine?.(`[${child.name}] ${line}`);
      if (pattern.test(text)) {
        clearTimeout(timer);
        resolveLine(text);
      }
    });
    child.process.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${child.name} exited with ${code}:\n${text.slice(-2000)}`));
    });
    // A binary that is not there (or may not run) never exits: spawn reports it here, once.
    child.process.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(spawnFailure(child.name, child.process.spawnfile, error));
    });
  });
}

/** The typed error of a process that could not be started; a missing nats-server says how to install it. */
export function spawnFailure(name: string, file: string, error: NodeJS.ErrnoException): ClusterError {
  const missing = error.code === 'ENOENT';
  const hint = missing && name === 'nats' ? ` (install Debian's: apt-get install -y nats-server, or name the binary with --nats-server)` : '';
  return new ClusterError('TANDEM_CLUSTER_START_FAILED', { process: name, file, reason: `${missing ? `${file} not found` : error.message}${hint}` }, { cause: error });
}

async function stopChild(child: Child): Promise<void> {
  const p = child.process;
  // No pid: it never started (its spawn failed), so there is no exit to wait for.
  if (p.pid === undefined || p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  const timer = setTimeout(() => p.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

export async function launchCluster(options: ClusterLaunchOptions): Promise<LaunchedCluster> {
  const host = options.host ?? '127.0.0.1';
  const stateDir = resolve(options.stateDir);
  await mkdir(join(stateDir, 'nats'), { recursive: true, mode: 0o700 });
  const config = join(stateDir, 'nats.conf');
  await writeFile(config, [
    `listen: 127.0.0.1:${options.natsPort}`, 'server_name: tandem-local', `max_payload: ${RECOMMENDED_MAX_PAYLOAD}`, natsAuthInclude(config),
    `jetstream { store_dir: ${JSON.stringify(join(stateDir, 'nats'))} }`, '',
  ].join('\n'), { mode: 0o600 });
  // nats-server reads an environment value as a config token: one starting with a digit is taken for a number.
  const password = (): string => `tandem-${randomBytes(24).toString('hex')}`;
  const gatewayEnv = { [natsPasswordVariable('gateway')]: password() };
  const workerEnv = { [natsPasswordVariable('worker')]: password() };
  const { [natsPasswordVariable('gateway')]: _g, [natsPasswordVariable('worker')]: _w, ...inherited } = process.env;
  const started: Child[] = [];
  const stop = async (): Promise<void> => {
    // Gateway and workers first, the server they talk to last.
    for (const child of started.slice(1).reverse()) await stopChild(child);
    if (started[0] !== undefined) await stopChild(started[0]);
  };
  const natsUrl = `nats://127.0.0.1:${options.natsPort}`;
  const node = (args: string[], env: Record<string, string>): ChildProcess => spawn(process.execPath, [options.bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...inherited, ...env } });
  try {
    const nats: Child = { name: 'nats', process: spawn(options.natsServer ?? DEFAULT_NATS_SERVER, ['-c', config], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...inherited, ...gatewayEnv, ...workerEnv } }) };
    started.push(nats);
    await waitFor(nats, /Server is ready/, 'stderr', 20_000);
    const backend = options.backend === undefined ? [] : ['--backend', options.backend];
    const ready: Promise<string>[] = [];
    for (let i = 0; i < options.workers; i++) {
      const range = options.ranges.length === 0 ? undefined : options.ranges[i % options.ranges.length];
      const worker: Child = { name: `worker-${i}${range === undefined ? '' : ` ${rangeName(range)}`}`, process: node(['cloud', '--role', 'worker', '--nats', natsUrl, '--model', options.modelDir, ...(range === undefined ? [] : ['--blocks', rangeName(range)]), ...backend], workerEnv) };
      started.push(worker);
      ready.push(waitFor(worker, /tandem worker \S+ serving/, 'stdout', 120_000, options.onLine));
    }
    await Promise.all(ready);
    const gateway: Child = { name: 'gateway', process: node(['cloud', '--role', 'gateway', '--nats', natsUrl, '--model', options.modelDir, '--host', host, '--port', String(options.gatewayPort), '--state', join(stateDir, 'gateway'), ...backend], gatewayEnv) };
    started.push(gateway);
    await waitFor(gateway, /listening on \S+/, 'stdout', 120_000, options.onLine);
    // The admin key line follows the first one.
    await new Promise((r) => setTimeout(r, 300));
    const out = gateway.text ?? '';
    return { natsUrl, gatewayUrl: /listening on (\S+)/.exec(out)?.[1] ?? '', adminKey: /admin key[^:]*: (\S+)/.exec(out)?.[1], stop };
  } catch (error) {
    await stop();
    throw error;
  }
}
