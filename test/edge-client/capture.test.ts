// What an edge sends, read off the wire: a split training run with the defenses, its
// evaluations, and the plug-in evaluation of an offsite adapter all go through a recording
// proxy. The stream carries no text, no token ids and no labels: only the negotiated
// envelopes, whose tensor frames are float hidden states and gradients.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { buildEmulator } from '../../emulator/index.ts';
import { trainEdge, trainOffsite, uploadAdapter } from '../../edge-client/index.ts';
import { DEFAULT_RECIPE, initBackend, loadTokenizer } from '../../model/index.ts';
import { decodeEnvelope } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import { startCaptureProxy } from './capture-proxy.ts';
import type { Capture } from './capture-proxy.ts';
import { DEMO_DATA, FIXTURE, MODEL_ID, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';

const ALLOWED = new Set(['hello', 'sessionOpen', 'sessionClose', 'forward', 'backward', 'heartbeat', 'chunk']);

function envelopesOf(capture: Capture): Envelope[] {
  return capture.ws.filter((m) => m.binary).map((m) => decodeEnvelope(new Uint8Array(m.data.buffer, m.data.byteOffset, m.data.byteLength)));
}

function haystack(capture: Capture): Buffer {
  return Buffer.concat([...capture.rest, ...capture.ws.map((m) => m.data)]);
}

function int32s(ids: number[]): Buffer {
  const b = Buffer.alloc(ids.length * 4);
  ids.forEach((id, i) => b.writeInt32LE(id, i * 4));
  return b;
}

function float32s(ids: number[]): Buffer {
  const b = Buffer.alloc(ids.length * 4);
  ids.forEach((id, i) => b.writeFloatLE(id, i * 4));
  return b;
}

/** What must never cross: each example's text, its label, and its token ids in the usual encodings. */
async function secrets(file: string): Promise<{ what: string; bytes: Buffer }[]> {
  const tokenizer = await loadTokenizer(FIXTURE);
  const lines = (await readFile(file, 'utf8')).split('\n').filter((l) => l.trim() !== '').slice(0, 40);
  const out: { what: string; bytes: Buffer }[] = [];
  for (const line of lines) {
    const { text, label } = JSON.parse(line) as { text: string; label: string };
    out.push({ what: `text ${text.slice(0, 24)}`, bytes: Buffer.from(text.slice(0, 24)) });
    out.push({ what: `label ${label}`, bytes: Buffer.from(`"${label}"`) });
    out.push({ what: `label ${label}`, bytes: Buffer.from(` ${label}`) });
    const ids = tokenizer.encode(text, { addSpecialTokens: false }).slice(0, 6);
    out.push({ what: `ids as int32 ${ids}`, bytes: int32s(ids) });
    out.push({ what: `ids as float32 ${ids}`, bytes: float32s(ids) });
    out.push({ what: `ids as bytes ${ids}`, bytes: Buffer.from(ids.filter((x) => x < 128)) });
  }
  return out.filter((s) => s.bytes.length >= 5);
}

function assertClean(capture: Capture, never: { what: string; bytes: Buffer }[], key: string): void {
  const all = haystack(capture);
  // The capture sees the edge's own bytes: its key travels in the REST headers and the socket.io handshake.
  assert.notEqual(all.indexOf(Buffer.from(key)), -1, 'the capture holds what the edge sent');
  for (const s of never) assert.equal(all.indexOf(s.bytes), -1, `the edge sent ${s.what}`);
}

function assertOnlyTensorFrames(envelopes: Envelope[], hidden: number): { forwards: number; backwards: number } {
  let forwards = 0;
  let backwards = 0;
  for (const e of envelopes) {
    assert.ok(ALLOWED.has(e.body.case), `the edge sent a ${e.body.case}`);
    if (e.body.case === 'forward' || e.body.case === 'backward') {
      if (e.body.case === 'forward') forwards++;
      else backwards++;
      for (const f of e.body.value.frames) {
        assert.ok(f.name === 'h_B' || f.name === 'g_M', `frame ${f.name}`);
        assert.equal(f.shape.length, 3);
        assert.equal(f.shape[2], hidden, 'every frame is [batch, seq, hidden]');
      }
    }
  }
  return { forwards, backwards };
}

describe('the data plane carries no text, token ids or labels', () => {
  let cloud: TestCloud;
  let cache: { dir: string; remove(): Promise<void> };
  before(async () => {
    await initBackend({ backend: 'wasm' });
    cloud = await startTestCloud();
    cache = await tempDir('cache');
  });
  after(async () => {
    await cloud.close();
    await cache.remove();
  });

  it('a split training run with defenses, and its evaluations, send only the negotiated tensor frames', async () => {
    const capture = await startCaptureProxy(cloud.url);
    try {
      const result = await trainEdge({
        cloud: capture.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 2, batchSize: 4, seqLen: 32, lr: 1e-2, seed: 3, valFraction: 0.05,
        methods: [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'] }], cacheDir: cache.dir,
        defenses: { noise: { sigma: 0.1, clip: 0 }, maxNorm: true, gradientNoise: { rho: 1 }, marvell: { scale: 1 } },
      });
      assert.equal(result.steps, 2);
      assert.ok(result.after && Number.isFinite(result.after.loss), 'the run evaluated through the cloud');
      const envelopes = envelopesOf(capture);
      const hello = envelopes.find((e) => e.body.case === 'hello');
      assert.ok(hello && hello.body.case === 'hello');
      assert.deepEqual(hello.body.value.defenses?.map((d) => d.name), ['noise', 'max-norm', 'gradient-noise', 'marvell']);
      const { forwards, backwards } = assertOnlyTensorFrames(envelopes, 64);
      assert.ok(forwards > 2 && backwards >= 2, `${forwards} forwards, ${backwards} backwards`);
      assertClean(capture, await secrets(DEMO_DATA), cloud.key);
    } finally {
      await capture.close();
    }
  });

  it('defenses auto are fitted to the model and the cut: the bottom moves to 3 blocks where a middle block is left, and not past it', async () => {
    for (const [asked, bottom, names] of [[1, 3, ['noise', 'deeper-bottom', 'marvell']], [3, 3, ['noise', 'marvell']]] as const) {
      const capture = await startCaptureProxy(cloud.url);
      try {
        const result = await trainEdge({
          cloud: capture.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: asked, top: 1 }, steps: 1, batchSize: 2, seqLen: 16, lr: 1e-2, seed: 3, evaluate: false,
          methods: [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'] }], cacheDir: cache.dir, defenses: 'auto',
        });
        assert.equal(result.steps, 1);
        const hello = envelopesOf(capture).find((e) => e.body.case === 'hello');
        assert.ok(hello && hello.body.case === 'hello');
        assert.equal(hello.body.value.cut?.bottom, bottom, `asked B = ${asked}`);
        assert.deepEqual(hello.body.value.defenses?.map((d) => d.name), names);
      } finally {
        await capture.close();
      }
    }
  });

  it('the plug-in evaluation of an offsite adapter sends no text and no adapter, only hidden states', async () => {
    const work = await tempDir('offsite');
    try {
      const bundleDir = join(work.dir, 'bundle');
      await buildEmulator({ modelDir: FIXTURE, keep: 2, cut: { bottom: 1, top: 1 }, outDir: bundleDir });
      const train = join(work.dir, 'train.txt');
      await writeFile(train, 'The cat sat on the mat. The dog ran to the park.\n'.repeat(8));
      const trained = await trainOffsite({
        ...DEFAULT_RECIPE, bundleDir, dataFile: train, outDir: join(work.dir, 'out'), methods: [{ method: 'block' }], steps: 1, batchSize: 2, seqLen: 16, lr: 0.01, evalEvery: 0, saveEvery: 0, backend: 'wasm',
      });
      const adapterDir = trained.adapterDir as string;
      // The first 40 labelled rows (all three labels): the ones `secrets` looks for.
      const rows = join(work.dir, 'rows.jsonl');
      await writeFile(rows, `${(await readFile(DEMO_DATA, 'utf8')).split('\n').slice(0, 40).join('\n')}\n`);
      const capture = await startCaptureProxy(cloud.url);
      try {
        const evaluation = await uploadAdapter({ cloudUrl: capture.url, key: cloud.key, adapterDir, dataFile: rows, seqLen: 32, cacheDir: cache.dir });
        assert.ok(Number.isFinite(evaluation.plugIn.loss) && evaluation.plugIn.accuracy !== undefined);
        assert.notEqual(evaluation.plugIn.loss, evaluation.baseline.loss);
        const envelopes = envelopesOf(capture);
        const { forwards, backwards } = assertOnlyTensorFrames(envelopes, 64);
        assert.ok(forwards > 0);
        assert.equal(backwards, 0, 'evaluation is forward only');
        assertClean(capture, await secrets(rows), cloud.key);
        // No request carries the adapter's weights either.
        const weights = await readFile(join(adapterDir, 'adapter_model.safetensors'));
        assert.equal(haystack(capture).indexOf(weights.subarray(weights.length - 64)), -1, 'the adapter stayed on the edge');
        assert.ok(capture.rest.every((r) => !r.toString('latin1').startsWith('POST')), 'no REST request carried a body');
      } finally {
        await capture.close();
      }
    } finally {
      await work.remove();
    }
  });
});
