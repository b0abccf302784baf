// Aggregate middle throughput of a NATS cluster: 4 concurrent sessions' steps (forward kept
// on its worker, backward from that tape) sent by a gateway's ClusterExecutor to 1, then 2,
// worker processes (`tandem cloud --role worker`, one compute thread each), on a random
// Llama whose middle does real work; and the NATS hop's share of a request's time (round
// trip at the gateway minus the worker's compute, over the round trip).
// `npm run bench -- cluster [--quick] [--steps N] [--sessions S]`.
//
// Only the middle is timed: the edges' own compute is left out, so tokens/s is what the
// cluster's workers deliver. On a 2-core machine shared with others the second worker
// competes for the same cores: read the scaling against the machine's load.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ClusterExecutor } from '../cloud-node/index.ts';
import { Rng, loadModelFolder } from '../model/index.ts';
import { startNatsServer } from '../test/cluster/nats-server.ts';
import { randomModelDir } from './split.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'tandem.js');

function spawnWorker(natsUrl: string, modelDir: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, [BIN, 'cloud', '--role', 'worker', '--nats', natsUrl, '--model', modelDir, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout?.on('data', (c: Buffer) => {
      out += c.toString();
      if (out.includes('tandem worker')) resolve(child);
    });
    child.stderr?.on('data', (c: Buffer) => { out += c.toString(); });
    child.once('exit', (code) => reject(new Error(`a worker exited with ${code}:\n${out}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const flag = (name: string, fallback: number): number => {
    const at = args.indexOf(name);
    return at >= 0 ? Number(args[at + 1]) : fallback;
  };
  const steps = flag('--steps', quick ? 2 : 4);
  const sessions = flag('--sessions', 4);
  const [batch, seq] = [2, 64];
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-cluster-'));
  const nats = await startNatsServer();
  const children: ChildProcess[] = [];
  try {
    // split's random Llama of 4 blocks (hidden 512): the middle does real work, a run stays in minutes.
    const modelDir = await randomModelDir(work, true);
    const loaded = await loadModelFolder(modelDir);
    const hidden = loaded.config.hiddenSize;
    const L = loaded.config.numHiddenLayers;
    const range = { start: 1, end: L - 1 };
    const shape: [number, number, number] = [batch, seq, hidden];
    const rng = new Rng(5);
    const tensor = (): Float32Array => Float32Array.from({ length: batch * seq * hidden }, () => rng.normal() * 0.5);
    const rows: { workers: number; sessions: number; tokensPerSecond: number; stepSeconds: number }[] = [];
    let overhead = 0;
    for (const workers of [1, 2]) {
      while (children.length < workers) children.push(await spawnWorker(nats.url, modelDir));
      const executor = await ClusterExecutor.connect({ natsUrl: nats.url, contentHash: `sha256:${loaded.contentHash}` });
      try {
        while (executor.workers < workers) await executor.directory.changed(1000);
        const h = Array.from({ length: sessions }, tensor);
        const g = Array.from({ length: sessions }, tensor);
        const session = async (i: number, n: number): Promise<void> => {
          for (let s = 0; s < n; s++) {
            const { tape } = await executor.forwardKeepingTape(range, h[i], shape, `t${i}`);
            await executor.backwardFromTape(tape, g[i], shape, `t${i}`);
          }
        };
        await Promise.all(h.map((_, i) => session(i, 1))); // warm-up: kernels, connections
        const before = executor.hop;
        const t0 = performance.now();
        await Promise.all(h.map((_, i) => session(i, steps)));
        const seconds = (performance.now() - t0) / 1000;
        const after = executor.hop;
        const tokensPerSecond = (sessions * steps * batch * seq) / seconds;
        rows.push({ workers, sessions, tokensPerSecond, stepSeconds: seconds / steps });
        const roundTrip = after.roundTripMs - before.roundTripMs;
        const compute = after.computeMs - before.computeMs;
        if (workers === 1) overhead = roundTrip > 0 ? Math.max(0, roundTrip - compute) / roundTrip : 0;
        process.stdout.write(`${workers} worker(s), ${sessions} sessions, [${shape.join(', ')}] over blocks [${range.start}, ${range.end}): ${tokensPerSecond.toFixed(0)} tokens/s; NATS hop ${((roundTrip - compute) / Math.max(1, after.requests - before.requests)).toFixed(1)} ms per request of ${(roundTrip / Math.max(1, after.requests - before.requests)).toFixed(1)} ms\n`);
      } finally {
        await executor.close();
      }
    }
    const speedup = rows[1].tokensPerSecond / rows[0].tokensPerSecond;
    process.stdout.write(`2 workers / 1 worker: ${speedup.toFixed(2)}x (target 1.7x); NATS overhead ${(overhead * 100).toFixed(1)}% of the request time with one worker (target <= 10%)\n`);
    return { model: { hidden, layers: L, middle: range }, batch, seq, steps, rows, speedup, natsOverheadFraction: overhead, note: 'middle only (edge compute excluded); overhead = (gateway round trip - worker compute) / round trip, one worker' };
  } finally {
    for (const c of children) await stop(c);
    await nats.close();
    await rm(work, { recursive: true, force: true });
  }
}
