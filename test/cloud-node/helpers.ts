// A cloud node on loopback and a minimal socket.io client speaking protocol v1, for tests.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import { io } from 'socket.io-client';
import type { Socket } from 'socket.io-client';
import { startCloudNode } from '../../cloud-node/index.ts';
import type { CloudNode, CloudNodeOptions } from '../../cloud-node/index.ts';
import { Rng } from '../../model/index.ts';
import {
  Reassembler, decodeEnvelope, decodeTensor, encodeEnvelope, encodeTensor, envelope, messagesForTransport,
} from '../../protocol/index.ts';
import type { Body, CodecSpec, Envelope, Hello, TensorFrame, Welcome } from '../../protocol/index.ts';

export const STORIES_DIR = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
export const HIDDEN = 64;
/** Small limits so that tests exercise chunking with tiny tensors. */
export const TEST_LIMITS = { maxMessageBytes: 16 * 1024, maxFrameBytes: 64 * 1024 };

const cleanups: (() => Promise<void>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

export async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'tandem-cloud-test-'));
  cleanups.push(() => rm(d, { recursive: true, force: true }));
  return d;
}

export interface TestNode extends CloudNode {
  adminKey: string;
  stateDir: string;
}

/** A node on 127.0.0.1:0 with a fresh state directory (or the one given), closed when the file ends. */
export async function startTestNode(options: Partial<CloudNodeOptions> = {}): Promise<TestNode> {
  const stateDir = options.stateDir ?? (await tempDir());
  const node = await startCloudNode({ modelDir: STORIES_DIR, stateDir, logLevel: 'silent', backend: 'wasm', limits: TEST_LIMITS, ...options });
  let closed = false;
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    await node.close();
  };
  cleanups.push(close);
  return { ...node, close, adminKey: node.adminKey ?? '', stateDir };
}

export async function api(node: CloudNode, method: string, path: string, key?: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown>; bytes: Uint8Array; headers: Headers }> {
  const headers: Record<string, string> = {};
  if (key !== undefined) headers.authorization = `Bearer ${key}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(`${node.url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const bytes = new Uint8Array(await response.arrayBuffer());
  let json: Record<string, unknown> = {};
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8')) as Record<string, unknown>;
  } catch {
    // binary
  }
  return { status: response.status, json, bytes, headers: response.headers };
}

export async function createTenantKey(node: TestNode, tenant: string): Promise<string> {
  const { status, json } = await api(node, 'POST', '/v1/keys', node.adminKey, { tenant });
  assert.equal(status, 201, JSON.stringify(json));
  return json.key as string;
}

export function helloBody(overrides: Partial<Hello> = {}): Body {
  const hello: Hello = {
    versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } },
    clientBuild: 'tandem-test/0',
    model: { id: 'stories260K', contentHash: '' },
    codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] },
    limits: { maxFrameBytes: 0, maxMessageBytes: 0, maxRank: 0, maxDim: 0, maxElements: 0 },
    cut: { bottom: 2, top: 2 },
    training: { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0 },
    allowNonFinite: false,
    ...overrides,
  };
  return { case: 'hello', value: hello };
}

function asBytes(value: unknown): Uint8Array {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new Error(`ack carried ${typeof value}, not bytes`);
}

let requestCounter = 0;

/** A protocol v1 client over socket.io-client: chunks what is too large and reassembles chunked replies. */
export class TestClient {
  readonly socket: Socket;
  maxMessageBytes = TEST_LIMITS.maxMessageBytes;
  sessionId = '';
  welcome?: Welcome;
  /** Reply chunks arrive in the ack, or (more than fit one packet) as `envelope` events before it. */
  private readonly replies = new Reassembler();

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('envelope', (bytes: unknown) => {
      const env = decodeEnvelope(asBytes(bytes));
      assert.equal(env.body.case, 'chunk', 'the cloud pushes only reply chunks');
      if (env.body.case === 'chunk') assert.equal(this.replies.accept(env.body.value), null, 'a pushed chunk never completes a reply');
    });
  }

  static async connect(node: CloudNode, key: string): Promise<TestClient> {
    const socket = io(node.url, { transports: ['websocket'], auth: { key }, reconnection: false, forceNew: true });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('connect_error', (err) => reject(err));
    });
    const client = new TestClient(socket);
    cleanups.push(async () => { client.close(); });
    return client;
  }

  close(): void {
    this.socket.disconnect();
  }

  /** Sends raw bytes as one `envelope` event and returns what the ack carried. */
  async sendRaw(bytes: Uint8Array): Promise<unknown> {
    return this.socket.timeout(20_000).emitWithAck('envelope', bytes);
  }

  /** Sends one encoded envelope (chunked when over the limit); returns the decoded reply and its bytes. */
  async requestBytes(bytes: Uint8Array, requestId: string): Promise<{ reply: Envelope; bytes: Uint8Array }> {
    const parts = messagesForTransport(bytes, requestId, this.maxMessageBytes);
    let ack: unknown = null;
    for (const part of parts) ack = await this.sendRaw(part);
    let whole: Uint8Array;
    const first = decodeEnvelope(asBytes(Array.isArray(ack) ? ack[0] : ack));
    if (first.body.case === 'chunk') {
      let done: Uint8Array | null = null;
      for (const chunk of Array.isArray(ack) ? ack : [ack]) {
        const env = decodeEnvelope(asBytes(chunk));
        assert.equal(env.body.case, 'chunk');
        if (env.body.case === 'chunk') done = this.replies.accept(env.body.value);
      }
      assert.ok(done !== null, 'a chunked reply must complete');
      whole = done;
    } else {
      assert.ok(!Array.isArray(ack), 'an array ack carries chunks');
      whole = asBytes(ack);
    }
    return { reply: decodeEnvelope(whole, { maxMessageBytes: 1 << 30 }), bytes: whole };
  }

  async request(body: Body, requestId = `req-${++requestCounter}`): Promise<Envelope> {
    return (await this.requestBytes(encodeEnvelope(envelope(requestId, body)), requestId)).reply;
  }

  async hello(overrides: Partial<Hello> = {}): Promise<Welcome> {
    const reply = await this.request(helloBody(overrides));
    assert.equal(reply.body.case, 'welcome', JSON.stringify(reply.body.value));
    const welcome = reply.body.value as Welcome;
    this.sessionId = welcome.sessionId;
    this.welcome = welcome;
    return welcome;
  }

  forwardBody(step: number, microbatch: number, frames: TensorFrame[], needsBackward = true, sessionId = this.sessionId): Body {
    return { case: 'forward', value: { sessionId, step, microbatch, frames, needsBackward } };
  }

  backwardBody(step: number, microbatch: number, frames: TensorFrame[], sessionId = this.sessionId): Body {
    return { case: 'backward', value: { sessionId, step, microbatch, frames } };
  }

  /** One whole step on a fresh random h_B: forward then backward; returns g_B. */
  async step(step: number, shape: [number, number, number] = [1, 8, HIDDEN], seed = step): Promise<Float32Array> {
    const h = randomTensor(shape, seed);
    const fwd = await this.request(this.forwardBody(step, 0, [frameOf(h, shape)]));
    assert.equal(fwd.body.case, 'forwardResult', JSON.stringify(fwd.body.value));
    const g = randomTensor(shape, seed + 1000);
    const bwd = await this.request(this.backwardBody(step, 0, [frameOf(g, shape)]));
    assert.equal(bwd.body.case, 'backwardResult', JSON.stringify(bwd.body.value));
    return bwd.body.case === 'backwardResult' ? decodeTensor(bwd.body.value.frames[0]) : new Float32Array(0);
  }
}

export function randomTensor(shape: readonly number[], seed: number): Float32Array {
  const rng = new Rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.normal();
  return out;
}

export function frameOf(data: Float32Array, shape: readonly number[], spec: CodecSpec = { codec: 'f32' }): TensorFrame {
  return encodeTensor(data, shape, spec);
}

/** Asserts that a reply is an Error envelope with this code and returns it. */
export function assertError(reply: Envelope, code: string): void {
  assert.equal(reply.body.case, 'error', `expected Error ${code}, got ${reply.body.case}`);
  if (reply.body.case === 'error') assert.equal(reply.body.value.code, code, reply.body.value.message);
}

/** The value of a sample in a node's GET /metrics (with `key` as the bearer, when given), 0 when absent. */
export async function metric(node: { url: string }, sample: string, key?: string): Promise<number> {
  const text = await (await fetch(`${node.url}/metrics`, key === undefined ? {} : { headers: { authorization: `Bearer ${key}` } })).text();
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line === undefined ? 0 : Number(line.slice(sample.length + 1));
}
