// `tandem demo`: a cloud node and an edge client on loopback, fine-tuning the shipped
// stories260K on the demo's private dataset, then a before/after table and what crossed
// the wire. Everything it needs is in the repository; nothing is fetched.
import { Command } from 'commander';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCloudNode } from '../cloud-node/index.ts';
import { formatBytes, progressPrinter, trainEdge } from '../edge-client/index.ts';
import type { EdgeTrainResult } from '../edge-client/index.ts';
import { initBackend } from '../model/index.ts';
import { numberFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { addCodecOptions, codecsFromFlags } from './recipe.ts';

const ROOT = join(import.meta.dirname, '..');
export const DEMO_MODEL_DIR = join(ROOT, 'test', 'fixtures', 'stories260K');
export const DEMO_DATA = join(ROOT, 'cli', 'demo-data', 'feelings.jsonl');

interface DemoFlags {
  json?: boolean;
  steps?: string;
  codecForward?: string;
  codecBackward?: string;
  backend?: string;
}

function demoJson(r: EdgeTrainResult, seconds: number): Record<string, unknown> {
  const f = r.wire.frames;
  return {
    model: r.model,
    contentHash: r.contentHash,
    data: { file: 'cli/demo-data/feelings.jsonl', task: 'label the feeling (happy, sad, scared)' },
    cut: r.cut,
    methods: r.methods,
    trainableParameters: r.trainableParameters,
    steps: r.steps,
    before: { valLoss: r.before?.loss ?? null, accuracy: r.before?.accuracy ?? null },
    after: { valLoss: r.after?.loss ?? null, accuracy: r.after?.accuracy ?? null },
    wire: {
      codecs: { forward: r.codecs.forward.codec, backward: r.codecs.backward.codec },
      bytesSent: r.wire.bytesSent,
      bytesReceived: r.wire.bytesReceived,
      upBytesPerToken: r.wire.upBytesPerToken,
      downBytesPerToken: r.wire.downBytesPerToken,
      forwardMessages: f.forwards,
      backwardMessages: f.backwards,
      activationBytesUp: f.forwardUpBytes,
      activationBytesDown: f.forwardDownBytes,
      gradientBytesUp: f.backwardUpBytes,
      gradientBytesDown: f.backwardDownBytes,
      meanRttMs: r.wire.meanRttMs,
      // Time the edge waited on the cloud (its middle and the wire), training and evaluation.
      cloudWaitSeconds: f.waitMs / 1000,
      // The split keeps these on the edge by construction: the cloud gets hidden states and gradients only.
      tokenIdsSent: 0,
      labelsSent: 0,
    },
    seconds,
  };
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('   ')).join('\n');
}

const pct = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : `${(100 * x).toFixed(1)}%`);

function report(r: EdgeTrainResult, seconds: number): string {
  const f = r.wire.frames;
  const quality = table([
    ['', 'before', 'after'],
    ['validation loss', r.before?.loss.toFixed(4) ?? '-', r.after?.loss.toFixed(4) ?? '-'],
    [`label accuracy (${r.after?.records ?? 0} held-out stories)`, pct(r.before?.accuracy), pct(r.after?.accuracy)],
  ]);
  const wire = table([
    ['what crossed the wire', 'edge → cloud', 'cloud → edge'],
    [`hidden states (${r.codecs.forward.codec})`, formatBytes(f.forwardUpBytes), formatBytes(f.forwardDownBytes)],
    [`gradients (${r.codecs.backward.codec})`, formatBytes(f.backwardUpBytes), formatBytes(f.backwardDownBytes)],
    ['all messages', formatBytes(r.wire.bytesSent), formatBytes(r.wire.bytesReceived)],
    ['per trained token', `${r.wire.upBytesPerToken.toFixed(0)} B`, `${r.wire.downBytesPerToken.toFixed(0)} B`],
    ['token ids, text, labels', 'none', 'none'],
  ]);
  return [
    '',
    `stories260K fine-tuned on a private dataset in split mode: the edge holds the embedding, blocks [0, ${r.cut.bottom}) and [${r.numLayers - r.cut.top}, ${r.numLayers}), the head, the data and the adapter (${r.trainableParameters} parameters); the cloud ran the middle.`,
    '',
    quality,
    '',
    wire,
    '',
    `${r.steps} steps in ${seconds.toFixed(1)} s, ${f.forwards} forward and ${f.backwards} backward messages, mean round trip ${r.wire.meanRttMs.toFixed(1)} ms; the edge waited ${(f.waitMs / 1000).toFixed(1)} s of it on the cloud's middle and the wire`,
  ].join('\n');
}

const DEMO_CODECS = { forward: 'int8-block', backward: 'f16' } as const;

export function demoCommand(io: CommandIo): Command {
  const command = new Command('demo')
    .description('start a cloud node and an edge client on loopback and fine-tune stories260K on a private dataset, split')
    .option('--json', 'print one JSON object instead of the table')
    .option('--steps <n>', 'training steps', '80')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu');
  return addCodecOptions(command, DEMO_CODECS).action(async (flags: DemoFlags) => {
      const steps = numberFlag('--steps', flags.steps, { min: 1, integer: true });
      const codecs = codecsFromFlags(flags, DEMO_CODECS);
      const t0 = performance.now();
      await initBackend({ backend: flags.backend, log: flags.json ? undefined : io.log });
      const work = await mkdtemp(join(tmpdir(), 'tandem-demo-'));
      const node = await startCloudNode({ modelDir: DEMO_MODEL_DIR, stateDir: join(work, 'cloud'), port: 0, logLevel: 'silent', backend: flags.backend });
      try {
        if (!flags.json) io.log(`cloud node on ${node.url} serving stories260K; the edge client connects over loopback`);
        const result = await trainEdge({
          cloud: node.url,
          key: node.adminKey as string,
          model: 'stories260K',
          data: DEMO_DATA,
          cut: { bottom: 1, top: 1 },
          methods: [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] }],
          ...codecs,
          steps,
          batchSize: 16,
          seqLen: 32,
          lr: 1e-2,
          schedule: 'cosine',
          warmupSteps: Math.min(10, Math.floor(steps / 10)),
          weightDecay: 0,
          maxGradNorm: 0,
          seed: 0,
          valFraction: 0.1,
          cacheDir: join(work, 'cache'),
          onEvent: flags.json ? undefined : progressPrinter(process.stderr.isTTY ? 'tty' : 'plain', { write: (s) => process.stderr.write(s) }, { every: 20 }),
        });
        const seconds = (performance.now() - t0) / 1000;
        io.out(flags.json ? JSON.stringify(demoJson(result, seconds)) : report(result, seconds));
      } finally {
        await node.close();
        await rm(work, { recursive: true, force: true });
      }
    });
}
