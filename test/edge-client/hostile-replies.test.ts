// The edge against a hostile cloud (a real node behind a man-in-the-middle that rewrites its
// answers): what the cloud proposes or echoes is taken only as far as the edge agreed to it.
// Each case is refused with TANDEM_EDGE_RESPONSE_INVALID naming the field.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { EdgeError, trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainOptions } from '../../edge-client/index.ts';
import { initBackend } from '../../model/index.ts';
import { ProtocolError, encodeTensor } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import { DEMO_DATA, MODEL_ID, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';
import { startHostileCloud } from './hostile-cloud-proxy.ts';
import type { HostileCloudHooks } from './hostile-cloud-proxy.ts';

let cloud: TestCloud;
let cache: { dir: string; remove(): Promise<void> };

before(async () => {
  await initBackend({ backend: 'wasm' });
  cloud = await startTestCloud();
  cache = await tempDir('hostile-cache');
});
after(async () => {
  await cloud.close();
  await cache.remove();
});

const run = (url: string, options: Partial<EdgeTrainOptions> = {}) => trainEdge({
  cloud: url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 1, batchSize: 2, seqLen: 16, lr: 1e-2, seed: 3,
  evaluate: false, cacheDir: cache.dir, methods: [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'] }], ...options,
});

/** Runs against the rewriting proxy; resolves with what the edge sent and the error (of `code`) it refused with. */
async function refused(hooks: HostileCloudHooks, options: Partial<EdgeTrainOptions> = {}, code = 'TANDEM_EDGE_RESPONSE_INVALID'): Promise<{ error: EdgeError | ProtocolError; sent: Envelope[] }> {
  const hostile = await startHostileCloud(cloud.url, hooks);
  try {
    const error = await run(hostile.url, options).then(() => assert.fail('the edge trained'), (e: unknown) => e);
    assert.ok(error instanceof EdgeError || error instanceof ProtocolError, String(error));
    assert.equal(error.code, code, error.message);
    return { error, sent: hostile.sent };
  } finally {
    await hostile.close();
  }
}

const rewriteModels = (change: (m: Record<string, unknown>) => void) => (path: string, body: Buffer): Buffer => {
  if (!path.startsWith('/v1/models') || path.includes('/edge')) return body;
  const json = JSON.parse(body.toString('utf8')) as { models: Record<string, unknown>[] };
  for (const m of json.models) change(m);
  return Buffer.from(JSON.stringify(json));
};

const welcome = (change: (w: Extract<Envelope['body'], { case: 'welcome' }>['value']) => void) => (_q: Envelope, reply: Envelope): Envelope => {
  if (reply.body.case === 'welcome') change(reply.body.value);
  return reply;
};

describe('the edge against a hostile cloud', () => {
  it('does not take a proposed cut with no block at the bottom (h_B would be the embeddings) or the top, and sends nothing', async () => {
    for (const cut of [{ bottom: 0, top: 1 }, { bottom: 1, top: 0 }]) {
      const { error, sent } = await refused({ rest: rewriteModels((m) => { m.defaultCut = cut; }) }, { cut: undefined });
      assert.equal((error as EdgeError).field, 'defaultCut');
      assert.equal(sent.length, 0, 'no session was opened');
    }
    // The user's own cut is theirs: the same proposal is not consulted.
    const hostile = await startHostileCloud(cloud.url, { rest: rewriteModels((m) => { m.defaultCut = { bottom: 0, top: 1 }; }) });
    try {
      assert.deepEqual((await run(hostile.url)).cut, { bottom: 1, top: 1 });
    } finally {
      await hostile.close();
    }
  });

  it('refuses a model list whose layer count is not its edge part\'s (auto defenses are chosen by it)', async () => {
    const { error } = await refused({ rest: rewriteModels((m) => { m.numLayers = 40; }) });
    assert.equal((error as EdgeError).field, 'numLayers');
  });

  it('refuses a Welcome that allows non-finite values the edge did not allow', async () => {
    const { error } = await refused({ reply: welcome((w) => { w.allowNonFinite = true; }) });
    assert.equal((error as EdgeError).field, 'welcome.allow_non_finite');
  });

  it('refuses a codec chosen with parameters the edge did not offer', async () => {
    const { error } = await refused({ reply: welcome((w) => { w.codecs.forward = { ...w.codecs.forward, blockSize: 256 }; }) }, { codecForward: { codec: 'int8-block', blockSize: 32 } });
    assert.equal((error as EdgeError).field, 'welcome.codecs');
  });

  it('refuses a reply for another session', async () => {
    const { error } = await refused({
      reply: (_q, r) => {
        if (r.body.case === 'forwardResult') r.body.value.sessionId = 'another-tenants-session';
        return r;
      },
    });
    assert.equal((error as EdgeError).field, 'forwardResult.session_id');
  });

  it('refuses a held middle adapter handed over with tensors the session did not ask for, or shaped otherwise', async () => {
    const out = await tempDir('hostile-out');
    try {
      type Frames = ReturnType<typeof encodeTensor>[];
      const rewrites: [(frames: Frames) => Frames, string, RegExp][] = [
        // A shape of its own: refused as the frame is decoded, before a byte of it is copied.
        [(frames) => frames.map((f, i) => (i === 0 ? encodeTensor(new Float32Array(1000 * 1000), [1000, 1000], { codec: 'f32' }, { name: f.name }) : f)), 'TANDEM_PROTO_FRAME_SHAPE_MISMATCH', /has shape \[1000, 1000\]; the session expects \[2, 64\]/],
        [(frames) => [...frames, encodeTensor(new Float32Array(4), [2, 2], { codec: 'f32' }, { name: 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight' })], 'TANDEM_EDGE_RESPONSE_INVALID', /is not one of the adapter the session asked for/],
        [(frames) => frames.slice(1), 'TANDEM_EDGE_RESPONSE_INVALID', /is missing/],
      ];
      for (const [rewrite, code, message] of rewrites) {
        const { error } = await refused({
          reply: (_q, r) => {
            if (r.body.case === 'stepCommitted' && r.body.value.frames.length > 0) r.body.value.frames = rewrite(r.body.value.frames);
            return r;
          },
        }, { middleLora: { r: 2 }, out: out.dir }, code);
        assert.match(error.message, message);
      }
    } finally {
      await out.remove();
    }
  });
});
