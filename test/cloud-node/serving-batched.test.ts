// A batched step over rows with different adapters and prompt lengths computes, per row, the
// tokens generate() picks for that row alone.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { batchedLastLogits, generate, GenerationLoop, initBackend, KvCache, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, tf } from '../../model/index.ts';
import { STORIES_DIR, tempDir } from './helpers.ts';
import { writeTestAdapters } from './serving-fixtures.ts';

test('batched greedy decoding over 4 adapters equals generate() per request, token for token', async () => {
  await initBackend({ backend: 'wasm' });
  const dirs = await writeTestAdapters(await tempDir(), 4);
  const loaded = await loadModelFolder(STORIES_DIR);
  const tokenizer = await loadTokenizer(STORIES_DIR);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapters = await Promise.all(dirs.map((d) => loadAdapter(model, d)));
  const prompts = ['Once upon a time', 'The cat', 'Lily wanted to play with her friend in the park', 'One day', 'Tom'];
  const requests = prompts.flatMap((p, i) => [{ ids: tokenizer.encode(p), adapter: i % 5 === 4 ? undefined : adapters[i % 4] }, { ids: tokenizer.encode(p), adapter: adapters[(i + 1) % 4] }]);
  const expected = requests.map((r) => generate(model, r.ids, { maxNewTokens: 12, temperature: 0, hooks: r.adapter?.hooks }).generatedIds);
  const baseline = generate(model, requests[0].ids, { maxNewTokens: 12, temperature: 0 }).generatedIds;
  assert.notDeepEqual(expected[0], baseline, 'the adapter changes the tokens');
  // Rows join at different steps (continuous batching): row r joins at step r % 3.
  const live = requests.map((r) => ({ loop: new GenerationLoop(model.config, r.ids, { maxNewTokens: 12, temperature: 0 }), cache: new KvCache(), next: r.ids as number[] | undefined, hooks: r.adapter?.hooks }));
  const before = tf.memory().numTensors;
  for (let step = 0; live.some((l) => l.next !== undefined); step++) {
    const rows = live.filter((l, r) => l.next !== undefined && r % 3 <= step);
    const logits = batchedLastLogits(model, rows.map((l) => ({ ids: l.next as number[], cache: l.cache, hooks: l.hooks })));
    rows.forEach((l, i) => { l.next = l.loop.take(logits[i]); });
  }
  assert.deepEqual(live.map((l) => l.loop.result().generatedIds), expected);
  for (const l of live) l.cache.dispose();
  assert.equal(tf.memory().numTensors, before, 'nothing but the caches stays allocated');
  for (const a of adapters) a.dispose();
  model.dispose();
});
