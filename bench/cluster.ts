// Aggregate middle throughput of a NATS cluster: 4 concurrent sessions' steps (forward kept
// on its worker, backward from that tape) sent by a gateway's ClusterExecutor to worker
// processes (`tandem cloud --role worker --engine ort-cpu`, one compute thread each) on a
// random Llama whose middle does real work; and the NATS hop's share of a request's time
// (round trip at the gateway minus the worker's compute, over the round trip).
// `npm run bench -- cluster [--quick] [--steps N] [--sessions S] [--engine ort-cpu|tfjs]`.
//
// Each worker gets a fixed number of intra-op threads (TANDEM_THREADS for ONNX Runtime,
// TF_NUM_INTRAOP_THREADS for tfjs): left to itself each takes every core, and two workers on a
// 2-core machine then fight over them. Rows: 1 worker × 1 thread, 2 workers × 1 thread (the
// scale-out), and 1 worker × 2 threads (the same cores in one process: the honest comparison).
// Only the middle is timed: the edges' own compute is left out. On a machine shared with
// others, read the figures against the load averages printed with each row, and against
// cpuParallelism: what a plain CPU loop gets in 2 processes at once over 1 (the ceiling of any
// 2-worker speedup on this machine at that moment).
import { loadavg } from 'node:os';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ClusterExecutor } from '../cloud-node/index.ts';
import { Rng, loadModelFolder } from '../model/index.ts';
import { startNatsServer } from '../test/cluster/nats-server.ts';
import { randomModelDir } from './_random-model.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'tandem.js');

function spawnWorker(natsUrl: string, modelDir: string, engine: string, threads: number): Promise<ChildProcess> {
  const args = [BIN, 'cloud', '--role', 'worker', '--nats', natsUrl, '--model', modelDir, '--log-level', 'warn'];
  if (engine !== 'tfjs') args.push('--engine', engine);
  const env = { ...process.env, TANDEM_THREADS: String(threads), TF_NUM_INTRAOP_THREADS: String(threads), TF_NUM_INTEROP_THREADS: '1', OMP_NUM_THREADS: String(threads) };
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
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

const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');

/** A plain CPU loop in `n` processes at once: the seconds of the slowest (how much two processes really get of the machine). */
async function spin(n: number): Promise<number> {
  const code = 'let x = 0; for (let i = 0; i < 8e8; i++) x += i % 7; if (x < 0) console.log(x);';
  const t0 = performance.now();
  await Promise.all(Array.from({ length: n }, () => new Promise<void>((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', code], { stdio: 'ignore' });
    child.once('exit', (c) => (c === 0 ? resolve() : reject(new Error(`the CPU loop exited with ${c}`))));
  })));
  return (performance.now() - t0) / 1000;
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
  const engineAt = args.indexOf('--engine');
  const engine = engineAt >= 0 ? (args[engineAt + 1] ?? '') : 'ort-cpu';
  if (!['ort-cpu', 'tfjs'].includes(engine)) throw new Error(`--engine must be ort-cpu or tfjs, got ${JSON.stringify(engine)}`);
  const [batch, seq] = [2, 64];
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-cluster-'));
  const nats = await startNatsServer();
  let children: ChildProcess[] = [];
  try {
    // split's random Llama of 4 blocks (hidden 512): the middle does real work, a run stays in minutes.
    const modelDir = await randomModelDir(work, 4);
    const loaded = await loadModelFolder(modelDir);
    const hidden = loaded.config.hiddenSize;
    const L = loaded.config.numHiddenLayers;
    const range = { start: 1, end: L - 1 };
    const shape: [number, number, number] = [batch, seq, hidden];
    const rng = new Rng(5);
    const tensor = (): Float32Array => Float32Array.from({ length: batch * seq * hidden }, () => rng.normal() * 0.5);
    const rows: { workers: number; threadsPerWorker: number; sessions: number; tokensPerSecond: number; stepSeconds: number; natsOverheadFraction: number; loadAverage: string }[] = [];
    const loadAtStart = load();
    process.stdout.write(`load average at start: ${loadAtStart}; engine ${engine}\n`);
    // What 2 processes get of this machine: 2 cores busy at once may not be twice one.
    const [spinOne, spinTwo] = [await spin(1), await spin(2)];
    const cpuParallelism = (2 * spinOne) / spinTwo;
    process.stdout.write(`a plain CPU loop: ${spinOne.toFixed(2)} s in 1 process, ${spinTwo.toFixed(2)} s in 2 at once: the machine gives 2 processes ${cpuParallelism.toFixed(2)}x of one\n`);
    for (const { workers, threads } of [{ workers: 1, threads: 1 }, { workers: 2, threads: 1 }, { workers: 1, threads: 2 }]) {
      for (const c of children) await stop(c);
      children = [];
      for (let i = 0; i < workers; i++) children.push(await spawnWorker(nats.url, modelDir, engine, threads));
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
        const roundTrip = after.roundTripMs - before.roundTripMs;
        const compute = after.computeMs - before.computeMs;
        const requests = Math.max(1, after.requests - before.requests);
        const overhead = roundTrip > 0 ? Math.max(0, roundTrip - compute) / roundTrip : 0;
        rows.push({ workers, threadsPerWorker: threads, sessions, tokensPerSecond, stepSeconds: seconds / steps, natsOverheadFraction: overhead, loadAverage: load() });
        process.stdout.write(`${workers} worker(s) × ${threads} thread(s), ${sessions} sessions, [${shape.join(', ')}] over blocks [${range.start}, ${range.end}): ${tokensPerSecond.toFixed(0)} tokens/s; worker compute ${(compute / requests).toFixed(1)} ms and NATS hop ${((roundTrip - compute) / requests).toFixed(1)} ms per request of ${(roundTrip / requests).toFixed(1)} ms (${(overhead * 100).toFixed(1)}%); load ${load()}\n`);
      } finally {
        await executor.close();
      }
    }
    const [one, two, oneWide] = rows;
    const speedup = two.tokensPerSecond / one.tokensPerSecond;
    const versusOneWide = two.tokensPerSecond / oneWide.tokensPerSecond;
    process.stdout.write(`2 workers × 1 thread / 1 worker × 1 thread: ${speedup.toFixed(2)}x (target 1.7x); 2 workers × 1 thread / 1 worker × 2 threads: ${versusOneWide.toFixed(2)}x; NATS overhead ${(one.natsOverheadFraction * 100).toFixed(1)}% of the request time with one worker (target <= 10%)\n`);
    return {
      model: { hidden, layers: L, middle: range }, engine, batch, seq, steps, rows, speedup, speedupOverOneWorkerTwoThreads: versusOneWide,
      natsOverheadFraction: one.natsOverheadFraction, loadAverage: { start: loadAtStart, end: load() }, cpuParallelism,
      note: 'middle only (edge compute excluded); overhead = (gateway round trip - worker compute) / round trip, 1 worker × 1 thread; speedup = 2 workers × 1 thread over 1 worker × 1 thread',
    };
  } finally {
    for (const c of children) await stop(c);
    await nats.close();
    await rm(work, { recursive: true, force: true });
  }
}
