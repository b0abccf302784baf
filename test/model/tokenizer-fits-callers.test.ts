// Every place that loads a tokenizer together with a model refuses one with ids past the
// model's vocab_size (ids with no embedding row), and does so before it does any work.
import assert from 'node:assert/strict';
import { cp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { CloudRest, EdgeError, downloadEdgePart, federate, loadEdgePart } from '../../edge-client/index.ts';
import { buildEmulator } from '../../emulator/index.ts';
import type { EmulateEvent } from '../../emulator/index.ts';
import { ModelError, initBackend, runAudit } from '../../model/index.ts';
import { EDGE_WEIGHTS_FILE } from '../../protocol/index.ts';
import { createTenantKey, startTestNode } from '../cloud-node/helpers.ts';
import { STORIES_DIR, rejectsModelError, tempDir } from './helpers.ts';

const DEMO_DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
const MISSING = join(import.meta.dirname, 'no-such-data.jsonl');

/** The fixture's tokenizer.json with one token more than the model's 512 embedding rows. */
async function tokenizerOneTooMany(): Promise<string> {
  const json = JSON.parse(await readFile(join(STORIES_DIR, 'tokenizer.json'), 'utf8')) as { added_tokens: unknown[] };
  json.added_tokens.push({ id: 512, content: '<zz>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: false });
  return JSON.stringify(json);
}

/** The fixture model folder (vocab_size 512) with that tokenizer. */
async function modelWithTooManyIds(): Promise<string> {
  const dir = await tempDir();
  for (const file of ['config.json', 'model.safetensors', 'tokenizer_config.json']) await cp(join(STORIES_DIR, file), join(dir, file));
  await writeFile(join(dir, 'tokenizer.json'), await tokenizerOneTooMany());
  return dir;
}

let dir: string;
before(async () => {
  await initBackend({ backend: 'wasm' });
  dir = await modelWithTooManyIds();
});

describe('a tokenizer with ids past vocab_size is refused by', () => {
  test('runAudit, before the data is read', async () => {
    await rejectsModelError(runAudit({ modelDir: dir, dataFile: MISSING, backend: 'wasm' }), 'TANDEM_TOKENIZER_INVALID', '513', 'vocab_size is 512');
  });

  test('buildEmulator, before it starts or writes the bundle', async () => {
    const outDir = join(await tempDir(), 'bundle');
    const events: EmulateEvent[] = [];
    const built = buildEmulator({ modelDir: dir, keep: 1, cut: { bottom: 1, top: 1 }, outDir, distill: { dataFile: DEMO_DATA, steps: 1, seqLen: 16 }, backend: 'wasm', onEvent: (e) => events.push(e) });
    await rejectsModelError(built, 'TANDEM_TOKENIZER_INVALID', '513', 'vocab_size is 512');
    assert.deepEqual(events, []);
    await assert.rejects(stat(outDir), { code: 'ENOENT' });
  });

  test('federate with a local model folder, before it asks the cloud for a round', async () => {
    let ready = false;
    const joined = federate({
      cloud: 'http://127.0.0.1:9', key: 'k', federation: 'f', data: DEMO_DATA, modelDir: dir, workDir: await tempDir(), backend: 'wasm', unreachableMs: 0,
      onReady: () => {
        ready = true;
      },
    });
    await rejectsModelError(joined, 'TANDEM_TOKENIZER_INVALID', '513', 'vocab_size is 512');
    assert.equal(ready, false);
  });

  // A node refuses to start on such a folder (serving checks its tokenizer), so a real edge
  // part is downloaded and then given the tokenizer a cloud could send in its place.
  test('loadEdgePart, as TANDEM_EDGE_RESPONSE_INVALID, before the edge weights are read', async () => {
    const node = await startTestNode();
    const rest = new CloudRest(node.url, await createTenantKey(node, 'owner'));
    const part = await downloadEdgePart(rest, 'stories260K', { bottom: 1, top: 1 }, await tempDir());
    const fitting = await loadEdgePart(part);
    fitting.model.dispose();
    await writeFile(join(part.dir, 'tokenizer.json'), await tokenizerOneTooMany());
    const refused = (err: unknown): true => {
      assert.ok(err instanceof EdgeError, String(err));
      assert.equal(err.code, 'TANDEM_EDGE_RESPONSE_INVALID', err.message);
      assert.match(err.message, /513 token ids.*vocab_size is 512/);
      assert.ok(err.cause instanceof ModelError && err.cause.code === 'TANDEM_TOKENIZER_INVALID');
      return true;
    };
    await assert.rejects(loadEdgePart(part), refused);
    // Without the weights the same refusal comes: they are not read first.
    await rm(join(part.dir, EDGE_WEIGHTS_FILE));
    await assert.rejects(loadEdgePart(part), refused);
  });
});
