// Split step time against local step time, per codec pair, on stories260K and on a random
// Llama of ~25M parameters, with bytes per trained token each way and raw TCP loopback
// throughput for scale. `npm run bench -- split [--quick] [--steps N] [--rounds R] [--engine NAME]`
// (12 steps in 3 rounds by default).
//
// --engine (default auto, the best that starts) runs both sides on it: the cloud's middle
// and, for the LoRA both sides train, the edge's bottom and top and the local baselines.
//
// Two local baselines: the whole model in one tape (cut (0, L)), and the same cut with a
// LocalMiddle, which, like the cloud, runs the middle's forward without a tape and
// recomputes it in backward (activation checkpointing at the cut) — the fair comparison
// for the cost of the wire itself.
//
// Each split row also says where its step goes (means over the timed steps): the edge's own
// work, its wait on the cloud (MiddleTraffic.waitMs), the node's middle compute in that wait
// (tandem_step_seconds from the node's /metrics) and the rest of it (codecs, socket.io, the
// node's handling). Edge and node share this machine's cores and take turns on them.
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCloudNode } from '../cloud-node/index.ts';
import { LlamaModel, initBackend, loadModelFolder, selectEngine } from '../model/index.ts';
import type { Cut, EngineChoice } from '../model/index.ts';
import { randomModelDir } from './_random-model.ts';
import { batches, median, methodsFor, nodeMiddleSeconds, openEdge, openOrt, timeSteps } from './_train-steps.ts';
import type { CodecName } from '../protocol/index.ts';

const FIXTURE = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');

interface Case {
  name: string;
  dir: string;
  cut: Cut;
  batch: number;
  seq: number;
}

const PAIRS: [CodecName, CodecName][] = [
  ['f32', 'f32'],
  ['f16', 'f16'],
  ['int8-block', 'f16'],
  ['int8-block', 'int8-block'],
];

async function tcpLoopbackBytesPerSecond(totalBytes: number): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const received = new Promise<number>((resolve) => {
    server.on('connection', (s) => {
      let n = 0;
      const t0 = performance.now();
      s.on('data', (d: Buffer) => {
        n += d.length;
        if (n >= totalBytes) {
          resolve(n / ((performance.now() - t0) / 1000));
          s.destroy();
        }
      });
    });
  });
  const client = connect(port, '127.0.0.1');
  const chunk = Buffer.alloc(1 << 20, 7);
  await new Promise<void>((r) => client.on('connect', r));
  for (let sent = 0; sent < totalBytes; sent += chunk.length) if (!client.write(chunk)) await new Promise((r) => client.once('drain', r));
  const rate = await received;
  client.destroy();
  await new Promise((r) => server.close(r));
  return rate;
}

async function runCase(c: Case, steps: number, rounds: number, work: string, choice: EngineChoice): Promise<Record<string, unknown>> {
  const loaded = await loadModelFolder(c.dir);
  const L = loaded.config.numHiddenLayers;
  const methods = methodsFor(L, c.cut);
  // Each round times every configuration for its share of the steps (after one warm-up step
  // each), local and split in turn: a machine that speeds up or slows down during the run
  // moves them alike, and each figure is the median over all its rounds.
  const perRound = Math.max(1, Math.ceil(steps / rounds));
  const data = batches(loaded.config.vocabSize, c.batch, c.seq, perRound + 1, 3);
  const full = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const parameters = [...loaded.weights.values()].reduce((n, w) => n + w.data.length, 0);
  const localEngine = await openOrt(choice, loaded.config, loaded.weights);
  const node = await startCloudNode({ modelDir: c.dir, stateDir: join(work, `${c.name}-state`), port: 0, logLevel: 'silent', engine: choice.name });
  const tokens = c.batch * c.seq;
  const local = { whole: [] as number[], cut: [] as number[] };
  const runs = PAIRS.map(([forward, backward]) => ({ forward, backward, times: [] as number[], total: 0, waitMs: 0, nodeSeconds: 0, up: 0, down: 0, trained: 0 }));
  try {
    const { client, id, edge, engine: edgeEngine, close } = await openEdge(node.url, node.adminKey as string, c.cut, work, choice);
    try {
      for (let round = 0; round < rounds; round++) {
        local.whole.push(...(await timeSteps(full, undefined, undefined, methods, data, localEngine)).times);
        local.cut.push(...(await timeSteps(full, c.cut, undefined, methods, data, localEngine)).times);
        for (const run of runs) {
          // A session per round: each trainer counts its steps from 0.
          const session = await client.openSession({ model: { id, contentHash: edge.contentHash }, cut: c.cut, codecs: { forward: [{ codec: run.forward }], backward: [{ codec: run.backward }] } });
          const middle = session.middle();
          // Where a step's time goes, over the timed steps: the edge's own work, and its wait on
          // the cloud, which is the node's middle compute plus the wire (codecs, socket.io, the
          // node's handling).
          let waitedBefore = 0;
          let nodeBefore: Promise<number> = Promise.resolve(0);
          const timed = await timeSteps(edge.model, c.cut, middle, methods, data, edgeEngine, () => {
            waitedBefore = middle.traffic.waitMs;
            nodeBefore = nodeMiddleSeconds(node.url, node.adminKey as string);
          });
          run.times.push(...timed.times);
          run.total += timed.total;
          run.waitMs += middle.traffic.waitMs - waitedBefore;
          run.nodeSeconds += (await nodeMiddleSeconds(node.url, node.adminKey as string)) - (await nodeBefore);
          const f = middle.traffic;
          run.up += f.forwardUpBytes + f.backwardUpBytes;
          run.down += f.forwardDownBytes + f.backwardDownBytes;
          run.trained += tokens * data.length;
          await session.close();
        }
      }
    } finally {
      await close();
    }
  } finally {
    await node.close();
    await localEngine?.dispose();
    full.dispose();
  }
  const localWhole = median(local.whole);
  const localCut = median(local.cut);
  const split = runs.map((run) => {
    const seconds = median(run.times);
    const timedSteps = run.times.length;
    const waitSeconds = run.waitMs / 1000 / timedSteps;
    return {
      forward: run.forward, backward: run.backward, stepSeconds: seconds,
      ratioToLocalWhole: seconds / localWhole, ratioToLocalCut: seconds / localCut,
      upBytesPerToken: run.up / run.trained, downBytesPerToken: run.down / run.trained,
      edgeSecondsPerStep: run.total / timedSteps - waitSeconds, waitSecondsPerStep: waitSeconds, nodeMiddleSecondsPerStep: run.nodeSeconds / timedSteps,
    };
  });
  return { model: c.name, parameters, layers: L, cut: c.cut, batch: c.batch, seq: c.seq, rounds, stepsPerRound: perRound, localWholeStepSeconds: localWhole, localCutStepSeconds: localCut, split };
}


export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const stepsAt = args.indexOf('--steps');
  const steps = stepsAt >= 0 ? Number(args[stepsAt + 1]) : quick ? 2 : 12;
  const roundsAt = args.indexOf('--rounds');
  const rounds = roundsAt >= 0 ? Number(args[roundsAt + 1]) : quick ? 1 : 3;
  if (!Number.isInteger(steps) || steps < 1 || !Number.isInteger(rounds) || rounds < 1 || rounds > steps) throw new Error(`--steps and --rounds must be integers with 1 <= rounds <= steps, got ${steps} and ${rounds}`);
  const backend = await initBackend();
  const engineAt = args.indexOf('--engine');
  const choice = await selectEngine({ engine: engineAt >= 0 ? args[engineAt + 1] : undefined });
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-split-'));
  try {
    const tcp = await tcpLoopbackBytesPerSecond(quick ? 64 << 20 : 256 << 20);
    const cases: Case[] = [
      { name: 'stories260K', dir: FIXTURE, cut: { bottom: 1, top: 1 }, batch: 8, seq: 64 },
      { name: quick ? 'random-llama (4 layers, --quick)' : 'random-llama', dir: await randomModelDir(work, quick ? 4 : 8), cut: quick ? { bottom: 1, top: 1 } : { bottom: 2, top: 2 }, batch: 4, seq: 128 },
    ];
    const results = [];
    for (const c of cases) results.push(await runCase(c, steps, rounds, work, choice));
    const lines = [`engine ${choice.name} (both sides), backend ${backend.name}; raw TCP loopback ${(tcp / 2 ** 20).toFixed(0)} MiB/s; median of ${rounds * Math.ceil(steps / rounds)} steps in ${rounds} rounds (each configuration in turn, a warm-up step before each share); per step (means): the edge's own work, its wait on the cloud, of which the node's middle compute, and the rest (wire, codecs, the node's handling)`, ''];
    const header = ['model', 'params', 'cut', 'fwd/bwd codec', 'step s', 'split/local whole', 'split/local cut', 'B/token up', 'B/token down', 'edge ms', 'wait ms', 'node middle ms', 'wire ms'];
    const rows: string[][] = [header];
    for (const r of results) {
      const cut = r.cut as Cut;
      rows.push([String(r.model), `${((r.parameters as number) / 1e6).toFixed(2)}M`, `(${cut.bottom},${cut.top})`, 'local whole', (r.localWholeStepSeconds as number).toFixed(3), '', '', '', '', '', '', '', '']);
      rows.push(['', '', '', 'local cut', (r.localCutStepSeconds as number).toFixed(3), '', '', '', '', '', '', '', '']);
      for (const s of r.split as Record<string, number | string>[]) {
        const ms = (x: unknown): string => ((x as number) * 1000).toFixed(0);
        rows.push(['', '', '', `${s.forward}/${s.backward}`, (s.stepSeconds as number).toFixed(3), (s.ratioToLocalWhole as number).toFixed(3), (s.ratioToLocalCut as number).toFixed(3), (s.upBytesPerToken as number).toFixed(0), (s.downBytesPerToken as number).toFixed(0),
          ms(s.edgeSecondsPerStep), ms(s.waitSecondsPerStep), ms(s.nodeMiddleSecondsPerStep), ms((s.waitSecondsPerStep as number) - (s.nodeMiddleSecondsPerStep as number))]);
      }
    }
    const widths = header.map((_, i) => Math.max(...rows.map((r) => r[i].length)));
    for (const r of rows) lines.push(r.map((c, i) => c.padEnd(widths[i])).join('  '));
    process.stdout.write(`${lines.join('\n')}\n`);
    return { engine: choice.name, backend: backend.name, tcpLoopbackBytesPerSecond: tcp, steps, rounds, cases: results };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
