// Offsite mode against a real node on loopback: emulator bundles built on request and kept,
// adapters trained on a bundle plugged into the full model and evaluated, hashes checked.
import assert from 'node:assert/strict';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { trainOffsite } from '../../edge-client/index.ts';
import { EdgeError } from '../../edge-client/index.ts';
import { downloadBundle, uploadAdapter } from '../../edge-client/index.ts';
import { OFFSITE_FILE } from '../../emulator/index.ts';
import { DEFAULT_RECIPE, evaluateLocal, tf } from '../../model/index.ts';
import { STORIES_DIR, api, createTenantKey, startTestNode, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';

let node: TestNode;
let key = '';
let work = '';
let adapterDir = '';
const query = '?keep=2&bottom=1&top=1';

before(async () => {
  node = await startTestNode({ backend: 'wasm' });
  key = await createTenantKey(node, 'alice');
  work = await tempDir();
  await writeFile(join(work, 'train.txt'), 'The cat sat on the mat. The dog ran to the park and played with a red ball.\n'.repeat(10));
  await writeFile(join(work, 'eval.jsonl'), ['{"text":"The dog ran to the park."}', '{"text":"A cat sat on a mat and slept."}'].join('\n'));
});

describe('emulators and adapter evaluation on the node', () => {
  it('serves a bundle built on request, kept in the state directory, that the edge downloads and verifies', async () => {
    const first = await api(node, 'GET', `/v1/models/stories260K/emulators${query}`, key);
    assert.equal(first.status, 200, JSON.stringify(first.json));
    assert.deepEqual(first.json.keptLayers, [1, 3]);
    const files = first.json.files as { name: string }[];
    assert.ok(files.some((f) => f.name === 'manifest.json') && files.some((f) => f.name === 'emulator.safetensors'));
    assert.equal((await readdir(join(node.stateDir, 'emulators'))).length, 1, 'the bundle is kept in the state directory');

    const bundle = await downloadBundle({ cloudUrl: node.url, key, modelId: 'stories260K', keep: 2, bottom: 1, top: 1, outDir: join(work, 'bundle') });
    assert.equal(bundle.manifest.checksum, (first.json.manifest as { checksum: string }).checksum);
    assert.equal(bundle.manifest.baseModel.contentHash, first.json.contentHash);

    const tooMany = await api(node, 'GET', '/v1/models/stories260K/emulators?keep=4&bottom=1&top=1', key);
    assert.equal(tooMany.status, 400);
    assert.equal(tooMany.json.code, 'TANDEM_EMULATOR_KEEP_INVALID');
    const unknown = await api(node, 'GET', `/v1/models/stories260K/emulators/files/weights.bin${query}`, key);
    assert.equal(unknown.json.code, 'TANDEM_EMULATOR_FILE_UNKNOWN');
    assert.equal((await api(node, 'GET', `/v1/models/stories260K/emulators${query}`)).status, 401);
  });

  it('plugs an offsite adapter into the full model, evaluates it, and keeps nothing', async () => {
    const trained = await trainOffsite({
      ...DEFAULT_RECIPE, bundleDir: join(work, 'bundle'), dataFile: join(work, 'train.txt'), outDir: join(work, 'offsite'), methods: [{ method: 'block' }],
      steps: 3, batchSize: 2, seqLen: 16, lr: 0.01, evalEvery: 0, saveEvery: 0, backend: 'wasm',
    });
    adapterDir = trained.adapterDir as string;
    const before = new Set((await readdir(tmpdir())).filter((n) => n.startsWith('tandem-adapter-eval-')));
    const evalFile = join(work, 'eval.jsonl');
    const first = await uploadAdapter({ cloudUrl: node.url, key, adapterDir, dataFile: evalFile, seqLen: 16 });
    const tensors = tf.memory().numTensors;
    const second = await uploadAdapter({ cloudUrl: node.url, key, adapterDir, dataFile: evalFile, seqLen: 16 });
    assert.equal(tf.memory().numTensors, tensors, 'an evaluation leaves no tensor behind');
    assert.equal(first.examples, 2);
    assert.ok(Number.isFinite(first.plugIn.loss) && first.plugIn.perplexity > 1);
    assert.notEqual(first.plugIn.loss, first.baseline.loss, 'the adapter changes the full model');
    // The served model is untouched: the baseline is the model alone, before and after.
    const local = await evaluateLocal({ modelDir: STORIES_DIR, dataFile: evalFile, seqLen: 16, batchSize: 8, backend: 'wasm' });
    assert.ok(Math.abs(first.baseline.loss - local.loss) < 1e-5, `${first.baseline.loss} vs ${local.loss}`);
    assert.deepEqual(second, first);
    const local2 = await evaluateLocal({ modelDir: STORIES_DIR, adapterDir, dataFile: evalFile, seqLen: 16, batchSize: 8, backend: 'wasm' });
    assert.ok(Math.abs(first.plugIn.loss - local2.loss) < 1e-5, `plug-in ${first.plugIn.loss} vs local ${local2.loss}`);
    // Nothing of the tenant's is left behind but the closed record of the evaluation's split session.
    assert.deepEqual((await readdir(tmpdir())).filter((n) => n.startsWith('tandem-adapter-eval-') && !before.has(n)), []);
    assert.deepEqual((await readdir(node.stateDir)).filter((n) => !['emulators', 'keys.json', 'sessions.json', 'sessions', 'serving', 'held'].includes(n)), []);
    assert.deepEqual(await readdir(join(node.stateDir, 'held')).catch(() => []), [], 'no held adapter kept');
    assert.deepEqual(await readdir(join(node.stateDir, 'serving', 'adapters')).catch(() => []), [], 'no served adapter kept');
    assert.equal((await readdir(join(node.stateDir, 'emulators'))).length, 1, 'one bundle, nothing else');
  });

  it('refuses an adapter trained against another base model before anything is sent', async () => {
    const record = JSON.parse(await readFile(join(adapterDir, OFFSITE_FILE), 'utf8')) as { baseModel: { contentHash: string } };
    record.baseModel.contentHash = `sha256:${'0'.repeat(64)}`;
    await writeFile(join(adapterDir, OFFSITE_FILE), JSON.stringify(record));
    await assert.rejects(
      uploadAdapter({ cloudUrl: node.url, key, adapterDir, dataFile: join(work, 'eval.jsonl'), seqLen: 16 }),
      (e: unknown) => e instanceof EdgeError && e.code === 'TANDEM_EDGE_ADAPTER_BASE_MISMATCH',
    );
  });

  it('refuses malformed adapters and data with typed errors', async () => {
    const body = (over: Record<string, unknown>) => ({ baseContentHash: node.url, adapter: { config: '{}', weights: '' }, data: { name: 'x.txt', text: 'hello there' }, ...over });
    const models = await api(node, 'GET', '/v1/models', key);
    const hash = ((models.json.models as { contentHash: string }[])[0]).contentHash;
    const bad = await api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', key, body({ baseContentHash: hash }));
    assert.equal(bad.status, 400);
    assert.equal(bad.json.code, 'TANDEM_ADAPTER_INVALID');
    const noData = await api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', key, body({ baseContentHash: hash, data: { name: 'x.jsonl', text: 'not json' } }));
    assert.equal(noData.json.code, 'TANDEM_ADAPTER_INVALID'); // the adapter is checked first
    const missing = await api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', key, { adapter: { config: '{}', weights: '' } });
    assert.equal(missing.json.code, 'TANDEM_REQUEST_INVALID');
  });

  it('a restarted node serves the stored bundle, and builds again one that no longer verifies', async () => {
    const [key16] = await readdir(join(node.stateDir, 'emulators'));
    const file = join(node.stateDir, 'emulators', key16, 'emulator.safetensors');
    const bytes = await readFile(file);
    const mtime = (await stat(file)).mtimeMs;
    const checksum = async (n: TestNode, k: string) => ((await api(n, 'GET', `/v1/models/stories260K/emulators${query}`, k)).json.manifest as { checksum: string }).checksum;
    const expected = await checksum(node, key);
    await node.close();
    const again = await startTestNode({ backend: 'wasm', stateDir: node.stateDir });
    assert.equal(await checksum(again, key), expected);
    assert.equal((await stat(file)).mtimeMs, mtime, 'served from the state directory, not rebuilt');
    await again.close();
    const damaged = Buffer.from(bytes);
    damaged[damaged.length - 1] ^= 1;
    await writeFile(file, damaged);
    const third = await startTestNode({ backend: 'wasm', stateDir: node.stateDir });
    assert.equal(await checksum(third, key), expected);
    assert.deepEqual(await readFile(file), bytes);
  });
});

describe('an emulator build runs on a thread of its own', () => {
  it('a node closed during a build ends it: its request is 503 TANDEM_NODE_CLOSING, no half-built folder stays, the bundle is not kept', async () => {
    // Enough distillation to be still building when the node closes (minutes of it, were it left to finish).
    const slow = await startTestNode({ backend: 'wasm', emulators: { distillData: join(work, 'train.txt'), distillSteps: 100_000 } });
    const tenant = await createTenantKey(slow, 'bob');
    const emulatorsDir = join(slow.stateDir, 'emulators');
    const request = api(slow, 'GET', `/v1/models/stories260K/emulators${query}`, tenant).catch((error: unknown) => ({ status: 0, json: { error: String(error) } as Record<string, unknown> }));
    // The build has started when its temporary folder (.<key>.<hex>) exists.
    for (let i = 0; !(await readdir(emulatorsDir).catch(() => [] as string[])).some((f) => f.startsWith('.')); i++) {
      assert.ok(i < 600, 'the build started');
      await new Promise((r) => setTimeout(r, 100));
    }
    // The node answers while it builds: its event loop is not the build's.
    assert.equal((await api(slow, 'GET', '/v1/health')).status, 200);
    await slow.close();
    const answer = await request;
    assert.equal(answer.status, 503, JSON.stringify(answer.json));
    assert.equal(answer.json.code, 'TANDEM_NODE_CLOSING');
    assert.deepEqual(await readdir(emulatorsDir), [], 'neither the half-built folder nor a bundle stays');
  });
});
