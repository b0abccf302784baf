// Soak: 20 sessions of two good tenants step for the whole run while, for the second part,
// a third tenant sends every kind of hostile input issue 9 lists (too-small limits, inflated
// top-k shapes, adapter configs with huge ranks, reply-cache floods, stalled chunk streams,
// long request ids, overflowing gradients, bad codec parameters, many sessions, huge Hello
// strings, REST floods, emulator bundle floods). Reports failed good steps, resident memory
// growth from after the warm-up to the end, and p50/p99 good step latency without and with
// the hostile tenant. `npm run bench -- soak [--seconds N] [--skip KIND,...]` (600 s by default; --skip leaves
// out the hostile kinds whose names start so). Phases: a
// warm-up (a tenth, at least 5 s, with one round of every hostile input), three tenths
// without the hostile tenant, the rest with it.
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { io } from 'socket.io-client';
import type { Socket } from 'socket.io-client';
import { startCloudNode } from '../cloud-node/index.ts';
import type { CloudNode } from '../cloud-node/index.ts';
import { LlamaModel, Rng, createAdapter, loadModelFolder, saveAdapter } from '../model/index.ts';
import {
  Reassembler, decodeEnvelope, encodeEnvelope, encodeTensor, envelope, messagesForTransport, splitMessage,
} from '../protocol/index.ts';
import type { Body, CodecOffer, Envelope, Hello, Limits, TensorFrame } from '../protocol/index.ts';

const FIXTURE = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');
const HIDDEN = 64;
const GOOD_SHAPE: [number, number, number] = [1, 16, HIDDEN];
const NO_LIMITS: Limits = { maxFrameBytes: 0, maxMessageBytes: 0, maxRank: 0, maxDim: 0, maxElements: 0 };
const F32: CodecOffer = { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] };

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function random(shape: readonly number[], seed: number, scale = 1): Float32Array {
  const rng = new Rng(seed);
  const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < out.length; i++) out[i] = rng.normal() * scale;
  return out;
}

function toBytes(x: unknown): Uint8Array {
  if (x instanceof Uint8Array) return x;
  if (x instanceof ArrayBuffer) return new Uint8Array(x);
  throw new Error('the ack carries no bytes');
}

/** A protocol v1 client: chunks what is too large, reassembles chunked replies (acked or pushed). */
class SoakClient {
  readonly socket: Socket;
  readonly #replies = new Reassembler();
  sessionId = '';
  maxMessageBytes = 4 * 1024 * 1024;
  #ids = 0;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('envelope', (bytes: unknown) => {
      const env = decodeEnvelope(toBytes(bytes));
      if (env.body.case === 'chunk') this.#replies.accept(env.body.value);
    });
  }

  static async connect(url: string, key: string): Promise<SoakClient> {
    const socket = io(url, { transports: ['websocket'], auth: { key }, reconnection: false, forceNew: true });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('connect_error', reject);
    });
    return new SoakClient(socket);
  }

  async raw(bytes: Uint8Array, timeoutMs = 60_000): Promise<unknown> {
    return this.socket.timeout(timeoutMs).emitWithAck('envelope', bytes);
  }

  async request(body: Body, requestId = `r${++this.#ids}`): Promise<Envelope> {
    let ack: unknown = null;
    for (const part of messagesForTransport(encodeEnvelope(envelope(requestId, body)), `${requestId}#${this.#ids}`, this.maxMessageBytes)) ack = await this.raw(part);
    let whole: Uint8Array | null = null;
    for (const part of Array.isArray(ack) ? ack : [ack]) {
      const env = decodeEnvelope(toBytes(part), { maxMessageBytes: 1 << 30 });
      if (env.body.case !== 'chunk') return env;
      whole = this.#replies.accept(env.body.value);
    }
    if (whole === null) throw new Error('a chunked reply did not complete');
    return decodeEnvelope(whole, { maxMessageBytes: 1 << 30 });
  }

  async hello(overrides: Partial<Hello> = {}): Promise<Envelope> {
    const hello: Hello = {
      versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } }, clientBuild: 'tandem-soak/0', model: { id: 'stories260K', contentHash: '' },
      codecs: F32, limits: NO_LIMITS, cut: { bottom: 2, top: 2 }, training: { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0 }, allowNonFinite: false,
      ...overrides,
    };
    const reply = await this.request({ case: 'hello', value: hello });
    if (reply.body.case === 'welcome') this.sessionId = reply.body.value.sessionId;
    return reply;
  }

  forward(step: number, microbatch: number, frame: TensorFrame, needsBackward = true): Promise<Envelope> {
    return this.request({ case: 'forward', value: { sessionId: this.sessionId, step, microbatch, frames: [frame], needsBackward } });
  }

  backward(step: number, microbatch: number, frames: TensorFrame[]): Promise<Envelope> {
    return this.request({ case: 'backward', value: { sessionId: this.sessionId, step, microbatch, frames } });
  }

  close(): void {
    this.socket.disconnect();
  }
}

function outcome(reply: Envelope): string {
  return reply.body.case === 'error' ? reply.body.value.code : reply.body.case;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

interface Phase {
  name: 'warmup' | 'without' | 'with';
}

async function keyFor(node: CloudNode, tenant: string): Promise<string> {
  const res = await fetch(`${node.url}/v1/keys`, { method: 'POST', headers: { authorization: `Bearer ${node.adminKey}`, 'content-type': 'application/json' }, body: JSON.stringify({ tenant }) });
  const json = (await res.json()) as { key: string };
  return json.key;
}

/** One hostile action after another, each kind in turn; what the node answered is counted per kind. */
async function hostile(node: CloudNode, key: string, adapter: { config: Record<string, unknown>; weights: string }, stop: () => boolean, answers: Map<string, Map<string, number>>, rounds = Infinity, skip: readonly string[] = []): Promise<void> {
  const count = (kind: string, answer: string): void => {
    const byAnswer = answers.get(kind) ?? new Map<string, number>();
    byAnswer.set(answer, (byAnswer.get(answer) ?? 0) + 1);
    answers.set(kind, byAnswer);
  };
  const rest = async (method: string, path: string, body?: unknown): Promise<string> => {
    const res = await fetch(`${node.url}${path}`, { method, headers: { authorization: `Bearer ${key}`, ...(body ? { 'content-type': 'application/json' } : {}) }, body: body ? JSON.stringify(body) : undefined });
    const text = await res.text();
    let code = '';
    try {
      code = (JSON.parse(text) as { code?: string }).code ?? '';
    } catch {
      // not JSON
    }
    return `${res.status}${code ? ` ${code}` : ''}`;
  };
  const attacker = await SoakClient.connect(node.url, key);
  const welcome = await attacker.hello();
  const contentHash = welcome.body.case === 'welcome' ? welcome.body.value.model.contentHash : '';
  let step = 0;
  const actions: [string, () => Promise<string>][] = [
    ['tiny max_message_bytes', async () => outcome(await attacker.request({ case: 'hello', value: { ...helloOf(), limits: { ...NO_LIMITS, maxMessageBytes: 1 } } }))],
    ['inflated top-k shape', async () => {
      const frame = { ...encodeTensor(random([1, 1, HIDDEN], 1), [1, 1, HIDDEN], { codec: 'topk', topkFraction: 0.01, topkValues: 'f16' }), shape: [2048, 512, HIDDEN] };
      return outcome(await attacker.forward(step++, 0, frame));
    }],
    ['adapter with a huge rank', () => rest('POST', '/v1/models/stories260K/adapters/evaluate', {
      baseContentHash: contentHash, adapter: { config: JSON.stringify({ ...adapter.config, r: 1_000_000 }), weights: adapter.weights }, data: { name: 'e.txt', text: 'The cat sat. '.repeat(8) }, seqLen: 16,
    })],
    ['reply-cache flood (100 micro-batches)', async () => {
      const s = step++;
      const frame = encodeTensor(random(GOOD_SHAPE, s), GOOD_SHAPE, { codec: 'f32' });
      let last = '';
      for (let mb = 0; mb < 100; mb++) last = outcome(await attacker.forward(s, mb, frame, false));
      return last;
    }],
    ['stalled chunk stream', async () => {
      const chunks = splitMessage(new Uint8Array(2 * 1024 * 1024), `stall-${step++}`, 1024 * 1024);
      const ack = await attacker.raw(chunks[0]);
      return ack === null ? 'held' : outcome(decodeEnvelope(toBytes(ack)));
    }],
    ['long request id', async () => {
      const bytes = encodeEnvelope(envelope('x'.repeat(100_000), { case: 'heartbeat', value: { sessionId: '', sequence: 0, sentAtMs: 0 } }));
      return outcome(decodeEnvelope(toBytes(await attacker.raw(bytes))));
    }],
    ['overflowing g_M', async () => {
      const s = step++;
      await attacker.forward(s, 0, encodeTensor(random(GOOD_SHAPE, s), GOOD_SHAPE, { codec: 'f32' }));
      const huge = random(GOOD_SHAPE, s + 1).map((v) => Math.sign(v) * 3e38);
      return outcome(await attacker.backward(s, 0, [encodeTensor(huge, GOOD_SHAPE, { codec: 'f32' })]));
    }],
    ['bad codec parameters', async () => outcome(await attacker.request({ case: 'hello', value: { ...helloOf(), codecs: { forward: [{ codec: 'topk', topkFraction: 7, topkValues: 'f16' }], backward: [{ codec: 'f32' }] } } }))],
    ['too many sessions (50 Hellos)', async () => {
      // Past the tenant's openSessions quota; then they are closed, as a client cycling
      // sessions would, so that the other attacks still reach what they attack.
      const other = await SoakClient.connect(node.url, key);
      let last = '';
      const opened: string[] = [];
      for (let i = 0; i < 50; i++) {
        const reply = await other.hello();
        if (reply.body.case === 'welcome') opened.push(reply.body.value.sessionId);
        last = outcome(reply);
      }
      for (const sessionId of opened) await other.request({ case: 'sessionClose', value: { sessionId, reason: 'cancelled', message: '' } });
      other.close();
      return last;
    }],
    ['huge Hello strings (256 KiB client build)', async () => outcome(await attacker.request({ case: 'hello', value: { ...helloOf(), clientBuild: 'b'.repeat(256 * 1024) } }))],
    ['REST flood (200 requests)', async () => {
      const answers = await Promise.all(Array.from({ length: 200 }, () => rest('GET', '/v1/models')));
      return answers.at(-1) ?? '';
    }],
    ['emulator bundle flood', async () => {
      const keep = 2 + (step % 2);
      const bottom = step++ % 2;
      return rest('GET', `/v1/models/stories260K/emulators?keep=${keep}&bottom=${bottom}&top=1`);
    }],
  ];
  // The first round runs whole whatever the time (every attack is answered at least once, on a
  // slow machine too); later rounds stop when the time is up.
  for (let round = 0; round < rounds && (round === 0 || !stop()); round++) {
    for (const [kind, action] of actions) {
      if (round > 0 && stop()) break;
      if (skip.some((prefix) => kind.startsWith(prefix))) continue;
      let answer: string;
      try {
        answer = await action();
      } catch (err) {
        answer = `threw: ${(err as Error).message.slice(0, 80)}`;
      }
      count(kind, answer);
    }
  }
  attacker.close();
}

function helloOf(): Hello {
  return {
    versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } }, clientBuild: 'tandem-soak/0', model: { id: 'stories260K', contentHash: '' },
    codecs: F32, limits: NO_LIMITS, cut: { bottom: 2, top: 2 }, training: { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0 }, allowNonFinite: false,
  };
}

async function smallAdapter(dir: string): Promise<{ config: Record<string, unknown>; weights: string }> {
  const loaded = await loadModelFolder(FIXTURE);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'] }], { seed: 1 });
  await saveAdapter(adapter, dir);
  adapter.dispose();
  model.dispose();
  return {
    config: JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>,
    weights: (await readFile(join(dir, 'adapter_model.safetensors'))).toString('base64'),
  };
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const at = args.indexOf('--seconds');
  const seconds = at >= 0 ? Number(args[at + 1]) : 600;
  if (!Number.isFinite(seconds) || seconds < 10) throw new Error(`--seconds must be a number >= 10, got ${args[at + 1]}`);
  // --skip a,b: leave out the hostile kinds whose names start so (to see what costs what).
  const skipAt = args.indexOf('--skip');
  const skip = skipAt >= 0 ? (args[skipAt + 1] ?? '').split(',').filter((k) => k !== '') : [];
  const warmupMs = Math.max(5, seconds * 0.1) * 1000;
  const withoutMs = seconds * 0.3 * 1000;
  const withMs = seconds * 1000 - warmupMs - withoutMs;
  const stateDir = await mkdtemp(join(tmpdir(), 'tandem-soak-'));
  const node = await startCloudNode({ modelDir: FIXTURE, stateDir, logLevel: 'silent', backend: 'cpu' });
  const phase: Phase = { name: 'warmup' };
  const latencies = { without: [] as number[], with: [] as number[] };
  let goodSteps = 0;
  let goodStepsFailed = 0;
  const failures: string[] = [];
  let stopping = false;
  try {
    const adapter = await smallAdapter(join(stateDir, 'adapter'));
    const tenants = [await keyFor(node, 'good-a'), await keyFor(node, 'good-b')];
    const hostileKey = await keyFor(node, 'hostile');
    const sessions = await Promise.all(Array.from({ length: 20 }, async (_, i) => {
      const client = await SoakClient.connect(node.url, tenants[i % 2]);
      const welcome = await client.hello();
      if (welcome.body.case !== 'welcome') throw new Error(`good session ${i} got no Welcome: ${outcome(welcome)}`);
      return client;
    }));
    const good = sessions.map(async (client, i) => {
      for (let step = 0; !stopping; step++) {
        const started = performance.now();
        try {
          const h = encodeTensor(random(GOOD_SHAPE, i * 100_000 + step), GOOD_SHAPE, { codec: 'f32' });
          const fwd = await client.forward(step, 0, h);
          let bwd = await client.backward(step, 0, [encodeTensor(random(GOOD_SHAPE, step + 7), GOOD_SHAPE, { codec: 'f32' })]);
          // Allowed by the protocol: the cloud lost the activations (budget, restart) and asks for h_B again.
          if (bwd.body.case === 'error' && bwd.body.value.code === 'TANDEM_ACTIVATIONS_GONE') {
            bwd = await client.backward(step, 0, [encodeTensor(random(GOOD_SHAPE, step + 7), GOOD_SHAPE, { codec: 'f32' }), h]);
          }
          goodSteps++;
          if (fwd.body.case !== 'forwardResult' || bwd.body.case !== 'backwardResult') {
            goodStepsFailed++;
            if (failures.length < 10) failures.push(`${outcome(fwd)} / ${outcome(bwd)}`);
            continue;
          }
        } catch (err) {
          goodSteps++;
          goodStepsFailed++;
          if (failures.length < 10) failures.push((err as Error).message);
          continue;
        }
        if (phase.name !== 'warmup') latencies[phase.name].push((performance.now() - started) / 1000);
        await sleep(100);
      }
    });
    // The warm-up includes one round of every hostile input, so that what is built once and
    // kept (emulator bundles, compiled code, the backend's pools) is there before the baseline.
    const warmupStarted = performance.now();
    await hostile(node, hostileKey, adapter, () => stopping, new Map(), 1, skip);
    await sleep(Math.max(0, warmupMs - (performance.now() - warmupStarted)));
    const afterWarmup = process.memoryUsage();
    const rssAfterWarmup = afterWarmup.rss;
    phase.name = 'without';
    await sleep(withoutMs);
    phase.name = 'with';
    const answers = new Map<string, Map<string, number>>();
    const attack = hostile(node, hostileKey, adapter, () => stopping, answers, Infinity, skip);
    await sleep(withMs);
    stopping = true;
    await Promise.all([...good, attack]);
    const end = process.memoryUsage();
    const rssEnd = end.rss;
    const sessionsFileBytes = (await stat(join(stateDir, 'sessions.json')).catch(() => ({ size: 0 }))).size;
    const ready = await fetch(`${node.url}/v1/ready`);
    for (const client of sessions) client.close();
    const without = [...latencies.without].sort((a, b) => a - b);
    const withHostile = [...latencies.with].sort((a, b) => a - b);
    const figures = {
      seconds,
      skippedHostileKinds: skip,
      goodSessions: sessions.length,
      goodSteps,
      goodStepsFailed,
      goodFailures: failures,
      rssAfterWarmupBytes: rssAfterWarmup,
      rssEndBytes: rssEnd,
      rssGrowthFraction: (rssEnd - rssAfterWarmup) / rssAfterWarmup,
      // Where it went: the JS heap, memory outside it (typed arrays, tensors), and the session
      // records the hostile tenant's Hellos added (kept in memory and rewritten on every step).
      heapUsedAfterWarmupBytes: afterWarmup.heapUsed,
      heapUsedEndBytes: end.heapUsed,
      externalAfterWarmupBytes: afterWarmup.external,
      externalEndBytes: end.external,
      sessionsFileBytes,
      p50WithoutHostileSeconds: quantile(without, 0.5),
      p99WithoutHostileSeconds: quantile(without, 0.99),
      p50WithHostileSeconds: quantile(withHostile, 0.5),
      p99WithHostileSeconds: quantile(withHostile, 0.99),
      stepsWithoutHostile: without.length,
      stepsWithHostile: withHostile.length,
      computeRestarts: node.compute.restarts,
      readyAtEnd: ready.status === 200,
      hostileAnswers: Object.fromEntries([...answers].map(([kind, byAnswer]) => [kind, Object.fromEntries(byAnswer)])),
    };
    process.stdout.write(`soak ${seconds} s: ${goodSteps} good steps, ${goodStepsFailed} failed; rss ${(rssAfterWarmup / 2 ** 20).toFixed(0)} -> ${(rssEnd / 2 ** 20).toFixed(0)} MiB (${(figures.rssGrowthFraction * 100).toFixed(1)}%)\n`);
    process.stdout.write(`heap ${(afterWarmup.heapUsed / 2 ** 20).toFixed(0)} -> ${(end.heapUsed / 2 ** 20).toFixed(0)} MiB, external ${(afterWarmup.external / 2 ** 20).toFixed(0)} -> ${(end.external / 2 ** 20).toFixed(0)} MiB, sessions.json ${(sessionsFileBytes / 2 ** 20).toFixed(1)} MiB\n`);
    process.stdout.write(`good step latency p50/p99: without hostile ${figures.p50WithoutHostileSeconds.toFixed(3)}/${figures.p99WithoutHostileSeconds.toFixed(3)} s, with ${figures.p50WithHostileSeconds.toFixed(3)}/${figures.p99WithHostileSeconds.toFixed(3)} s\n`);
    for (const [kind, byAnswer] of answers) process.stdout.write(`  hostile ${kind}: ${[...byAnswer].map(([a, n]) => `${a} x${n}`).join(', ')}\n`);
    return figures;
  } finally {
    stopping = true;
    await node.close();
    await rm(stateDir, { recursive: true, force: true });
  }
}
