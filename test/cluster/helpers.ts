// A cluster on loopback for the tests: a real nats-server, workers (in this process or as
// `tandem cloud --role worker` child processes), gateways (cloud nodes with `cluster`), and
// split training through them compared with one process.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { startCloudNode, startMiddleWorkerNode } from '../../cloud-node/index.ts';
import type { CloudNode, CloudNodeOptions, MiddleWorkerNode } from '../../cloud-node/index.ts';
import { trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainOptions } from '../../edge-client/index.ts';
import type { SessionRecord } from '../../cloud-node/state/session-store.ts';
import type { MethodSpec } from '../../model/index.ts';
import { DEMO_DATA, FIXTURE, MODEL_ID, tempDir } from '../edge-client/helpers.ts';

export { DEMO_DATA, FIXTURE, MODEL_ID, maxAdapterDiff, tempDir } from '../edge-client/helpers.ts';

export const BIN = join(import.meta.dirname, '..', '..', 'bin', 'tandem.js');
export const LORA: MethodSpec[] = [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'], layersToTransform: [0, 4], initLoraWeights: false }];
export const RUN = { steps: 4, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 3 };

export async function startWorker(natsUrl: string, blocks?: string): Promise<MiddleWorkerNode> {
  return startMiddleWorkerNode({ modelDir: FIXTURE, natsUrl, blocks, backend: 'wasm', logLevel: 'silent' });
}

const adminKeys = new Map<string, string>();

/** A gateway on 127.0.0.1:0; short attempt timeouts so that a dead worker is noticed quickly. */
export async function startGateway(natsUrl: string, options: Partial<CloudNodeOptions> = {}): Promise<CloudNode & { stateDir: string; remove(): Promise<void> }> {
  const state = options.stateDir === undefined ? await tempDir('gateway') : undefined;
  const stateDir = options.stateDir ?? (state as { dir: string }).dir;
  const node = await startCloudNode({
    modelDir: FIXTURE, stateDir, logLevel: 'silent', backend: 'wasm',
    cluster: { natsUrl, attemptTimeoutMs: 3000, requestTimeoutMs: 25_000 }, ...options,
  });
  // The first gateway of a cluster makes the admin key; later ones find it in JetStream.
  if (node.adminKey !== undefined) adminKeys.set(natsUrl, node.adminKey);
  return { ...node, adminKey: node.adminKey ?? adminKeys.get(natsUrl), stateDir, remove: async () => { await node.close(); await state?.remove(); } };
}

/** A gateway in this process. */
export type TestGateway = Awaited<ReturnType<typeof startGateway>>;

/**
 * Workers of `ranges` (undefined: the whole middle) and a gateway in this process, once the
 * gateway sees every worker; `use` runs on them, then all are closed.
 */
export async function onCluster<T>(natsUrl: string, ranges: (string | undefined)[], use: (gateway: TestGateway, workers: MiddleWorkerNode[]) => Promise<T>): Promise<T> {
  const workers: MiddleWorkerNode[] = [];
  let gateway: TestGateway | undefined;
  try {
    for (const range of ranges) workers.push(await startWorker(natsUrl, range));
    const started = await startGateway(natsUrl);
    gateway = started;
    await until(async () => (await started.cluster?.status.workers())?.length === ranges.length, 10_000, 'every worker announced');
    return await use(started, workers);
  } finally {
    await gateway?.remove();
    for (const w of workers) await w.close();
  }
}

/** `tandem cloud --role worker` as a child process; resolves once it says it is ready. */
export async function spawnWorker(natsUrl: string, blocks?: string): Promise<ChildProcess> {
  const args = [BIN, 'cloud', '--role', 'worker', '--nats', natsUrl, '--model', FIXTURE, '--backend', 'wasm', '--log-level', 'info'];
  if (blocks !== undefined) args.push('--blocks', blocks);
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`the worker did not start:\n${out}`)), 60_000);
    const onData = (chunk: Buffer): void => {
      out += chunk.toString();
      if (out.includes('tandem worker')) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', (c: Buffer) => { out += c.toString(); });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the worker exited with ${code}:\n${out}`));
    });
  });
  return child;
}

export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  await exited;
}

/** Waits until `ok()` holds (polling), failing after `ms`. */
export async function until(ok: () => boolean | Promise<boolean>, ms = 20_000, what = 'the condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Split training of the shared recipe through `cloud` (one URL or several). */
export async function trainThrough(cloud: string, key: string, options: Partial<EdgeTrainOptions> = {}): Promise<{ losses: number[]; adapter: Map<string, Float32Array> }> {
  const cache = await tempDir('cache');
  try {
    const result = await trainEdge({
      cloud, key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods: LORA, ...RUN,
      codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: cache.dir, ...options,
    });
    return { losses: result.losses, adapter: new Map([...result.adapter].map(([k, v]) => [k, (v as { data: Float32Array }).data ?? v])) };
  } finally {
    await cache.remove();
  }
}

/** trainThrough a single-process node of the fixture: what the cluster runs are held to. */
export async function trainOnOneProcess(options: Partial<EdgeTrainOptions> = {}): Promise<{ losses: number[]; adapter: Map<string, Float32Array> }> {
  const state = await tempDir('single');
  const node = await startCloudNode({ modelDir: FIXTURE, stateDir: state.dir, logLevel: 'silent', backend: 'wasm' });
  try {
    return await trainThrough(node.url, node.adminKey as string, options);
  } finally {
    await node.close();
    await state.remove();
  }
}

/** `tandem cloud --role gateway` as a child process on a free port; resolves with its URL (and the admin key when it made one). */
export async function spawnGateway(natsUrl: string, stateDir: string, port: number): Promise<{ child: ChildProcess; url: string; adminKey?: string }> {
  const args = [BIN, 'cloud', '--role', 'gateway', '--nats', natsUrl, '--model', FIXTURE, '--backend', 'wasm', '--port', String(port), '--state', stateDir, '--worker-timeout', '3', '--log-level', 'warn'];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the gateway did not start:\n${out}`)), 60_000);
    child.stdout?.on('data', (c: Buffer) => {
      out += c.toString();
      if (out.includes('listening on') && (out.includes('admin key') || /listening on \S+\n/.test(out))) {
        clearTimeout(timer);
        // The admin key line, when there is one, follows the first in the same write.
        setTimeout(resolve, 100);
      }
    });
    child.stderr?.on('data', (c: Buffer) => { out += c.toString(); });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the gateway exited with ${code}:\n${out}`));
    });
  });
  const url = /listening on (\S+)/.exec(out)?.[1] ?? '';
  return { child, url, adminKey: /admin key[^:]*: (\S+)/.exec(out)?.[1] };
}

/** An open session record of `tenant`, as a Hello would add it (what the store tests add and count). */
export function openSessionRecord(tenant: string, id: string = randomUUID()): SessionRecord {
  const now = new Date().toISOString();
  return {
    id, tenant, modelId: 'm', contentHash: 'h', version: { major: 1, minor: 3 }, cut: { bottom: 1, top: 1 }, codecs: {}, limits: {}, training: {},
    allowNonFinite: false, clientBuild: 'test', state: 'open', lastStep: -1, createdAt: now, updatedAt: now,
  } as unknown as SessionRecord;
}
