// Aggregate middle throughput of a NATS cluster: 4 concurrent sessions' steps (forward kept
// on its worker, backward from that tape) sent by a gateway's ClusterExecutor to worker
// processes (`tandem cloud --role worker --engine ort-cpu`, one compute thread each) on a
// random Llama whose middle does real work; and the NATS hop (round trips at the gateway minus
// the worker's compute) as a share of whole split training steps: an edge (bottom and top,
// LoRA r8, int8-block forward and f16 backward) training through an in-process gateway whose
// middle is one worker process.
// `npm run bench -- cluster [--quick] [--steps N] [--sessions S] [--engine ort-cpu|tfjs]`.
//
// Each worker gets a fixed number of intra-op threads (TANDEM_THREADS for ONNX Runtime,
// TF_NUM_INTRAOP_THREADS for tfjs): left to itself each takes every core, and two workers on a
// 2-core machine then fight over them. Rows: 1 worker × 1 thread, 2 workers × 1 thread (the
// scale-out), and 1 worker × 2 threads (the same cores in one process: the honest comparison).
// The throughput rows time only the middle: the edges' own compute is left out (on 2 cores it
// would take the workers' CPU). The step row times what a user waits for, the whole step, and
// the hop's share of it is the figure; its share of a middle request alone is printed
// too (the stricter reading). On a machine shared with
// others, read the figures against the load averages printed with each row, and against
// cpuParallelism: what a plain CPU loop gets in 2 processes at once over 1 (the ceiling of any
// 2-worker speedup on this machine at that moment).
import { loadavg } from 'node:os';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ClusterExecutor, startCloudNode } from '../cloud-node/index.ts';
import { RECOMMENDED_MAX_PAYLOAD } from '../cloud-node/cluster/wire-spill.ts';
import { Rng, loadModelFolder, selectEngine } from '../model/index.ts';
import type { Cut, ModelConfig } from '../model/index.ts';
import { startNatsServer } from '../test/cluster/nats-server.ts';
import { randomModelDir } from './_random-model.ts';
import { batches, methodsFor, openEdge, timeSteps } from './_train-steps.ts';

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

interface StepRow {
  batch: number;
  seq: number;
  stepSeconds: number;
  /** The hop (round trips less the worker's compute) over the wall time of the timed steps. */
  natsOverheadFraction: number;
  hopMsPerStep: number;
  /** Bytes of the request bodies sent to workers per step (the edge's int8-block h_B and f16 g_M travel as they came). */
  requestBytesPerStep: number;
  middleComputeMsPerStep: number;
}

/** Split training steps of one edge through a gateway in this process and one worker process (the row's workers: 1). */
async function stepThroughGateway(natsUrl: string, modelDir: string, config: ModelConfig, engine: string, work: string, steps: number, cut: Cut, batch: number, seq: number): Promise<StepRow> {
  const worker = await spawnWorker(natsUrl, modelDir, engine, 1);
  const node = await startCloudNode({ modelDir, stateDir: join(work, 'gateway-state'), port: 0, logLevel: 'silent', cluster: { natsUrl } });
  try {
    while ((await node.cluster?.status.workers())?.length !== 1) await new Promise((r) => setTimeout(r, 100));
    const choice = await selectEngine({ engine: engine === 'ort-cpu' ? 'ort-cpu' : 'wasm' });
    const { client, id, edge, engine: edgeEngine, close } = await openEdge(node.url, node.adminKey as string, cut, work, choice);
    try {
      const session = await client.openSession({ model: { id, contentHash: edge.contentHash }, cut, codecs: { forward: [{ codec: 'int8-block' }], backward: [{ codec: 'f16' }] } });
      const hop = () => node.cluster?.hop() ?? { requests: 0, roundTripMs: 0, computeMs: 0, requestBytes: 0 };
      let before = hop();
      const data = batches(config.vocabSize, batch, seq, steps + 1, 3);
      const timed = await timeSteps(edge.model, cut, session.middle(), methodsFor(config.numHiddenLayers, cut), data, edgeEngine, () => { before = hop(); });
      const after = hop();
      await session.close();
      const hopMs = (after.roundTripMs - before.roundTripMs) - (after.computeMs - before.computeMs);
      return {
        batch, seq, stepSeconds: timed.median, natsOverheadFraction: Math.max(0, hopMs) / (timed.total * 1000),
        hopMsPerStep: hopMs / steps, middleComputeMsPerStep: (after.computeMs - before.computeMs) / steps,
        requestBytesPerStep: (after.requestBytes - before.requestBytes) / steps,
      };
    } finally {
      await close();
    }
  } finally {
    await node.close();
    await stop(worker);
  }
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
  // max_payload as infra/nats and `tandem cluster up` set it (8MB; the server's default is 1MB):
  // the step row's 1 MiB activations then travel inline, not through the object store.
  const nats = await startNatsServer({ maxPayload: RECOMMENDED_MAX_PAYLOAD });
  let children: ChildProcess[] = [];
  try {
    // The split bench's 25M random Llama (8 blocks, hidden 512) and its cut (2, 2): the middle is
    // blocks [2, 6). --quick: 4 blocks, cut (1, 1).
    const modelDir = await randomModelDir(work, quick ? 4 : 8);
    const loaded = await loadModelFolder(modelDir);
    const hidden = loaded.config.hiddenSize;
    const L = loaded.config.numHiddenLayers;
    const cut: Cut = quick ? { bottom: 1, top: 1 } : { bottom: 2, top: 2 };
    const range = { start: cut.bottom, end: L - cut.top };
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
        // Warm-up: kernels, connections, on every worker (at least as many at once as workers: the least busy takes each).
        await Promise.all(Array.from({ length: Math.max(sessions, workers) }, (_, i) => session(i % sessions, 1)));
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
    for (const c of children) await stop(c);
    children = [];
    // The split bench's step on this model: 4 x 128 tokens.
    const step = await stepThroughGateway(nats.url, modelDir, loaded.config, engine, work, steps * 2, cut, 4, 128);
    process.stdout.write(`a split training step through a gateway and 1 worker (4 x 128 tokens, cut ${cut.bottom}/${cut.top}, int8-block forward, f16 backward): ${(step.stepSeconds * 1000).toFixed(1)} ms; middle compute ${step.middleComputeMsPerStep.toFixed(1)} ms and NATS hop ${step.hopMsPerStep.toFixed(1)} ms per step (request bodies ${(step.requestBytesPerStep / 2 ** 20).toFixed(2)} MiB): the hop is ${(step.natsOverheadFraction * 100).toFixed(1)}% of the step time (target <= 10%)\n`);
    const [one, two, oneWide] = rows;
    const speedup = two.tokensPerSecond / one.tokensPerSecond;
    const versusOneWide = two.tokensPerSecond / oneWide.tokensPerSecond;
    process.stdout.write(`2 workers × 1 thread / 1 worker × 1 thread: ${speedup.toFixed(2)}x (target 1.7x); 2 workers × 1 thread / 1 worker × 2 threads: ${versusOneWide.toFixed(2)}x; NATS hop ${(one.natsOverheadFraction * 100).toFixed(1)}% of a middle request's time with one worker\n`);
    return {
      model: { hidden, layers: L, middle: range }, engine, batch, seq, steps, rows, speedup, speedupOverOneWorkerTwoThreads: versusOneWide,
      natsOverheadFraction: step.natsOverheadFraction, step, natsOverheadFractionOfMiddleRequest: one.natsOverheadFraction,
      loadAverage: { start: loadAtStart, end: load() }, cpuParallelism,
      note: 'rows: middle only (edge compute excluded), speedup = 2 workers × 1 thread over 1 worker × 1 thread; natsOverheadFraction = (gateway round trips - worker compute) / wall time of whole split training steps through a gateway and 1 worker; natsOverheadFractionOfMiddleRequest = the same over the middle requests\' round trips (1 worker × 1 thread)',
    };
  } finally {
    for (const c of children) await stop(c);
    await nats.close();
    await rm(work, { recursive: true, force: true });
  }
}
