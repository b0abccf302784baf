// The ONNX Runtime serving step: rows with different adapters (unmerged, stacked per batch),
// prompt lengths and join times give, token for token, what `tandem generate --adapter
// --engine ort-cpu` computes for each alone (the adapter merged into the weights, generateOrt).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { generateOrt, GenerationLoop, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, loraParamsOf, mergedWeightArrays, ModelError, ortLoraPlan, OrtLlama, OrtServingEngine, ServingLora, ServingThread } from '../../../model/index.ts';
import type { OrtServing } from '../../../model/index.ts';
import { STORIES_DIR, tempDir } from '../../cloud-node/helpers.ts';
import { writeTestAdapters } from '../../cloud-node/serving-fixtures.ts';

test('batched ORT serving over 4 adapters equals generateOrt with each adapter merged, token for token', async (t) => {
  await initBackend({ backend: 'wasm' });
  const dirs = await writeTestAdapters(await tempDir(), 4);
  const loaded = await loadModelFolder(STORIES_DIR);
  const tokenizer = await loadTokenizer(STORIES_DIR);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapters = await Promise.all(dirs.map((d) => loadAdapter(model, d)));
  const serving = await OrtServingEngine.create(loaded.config, loaded.weights, { threads: 1 });
  t.after(() => serving.dispose());
  const loras = adapters.map((a) => {
    const planned = ortLoraPlan(a, loaded.config);
    assert.ok(planned.plan, planned.reason);
    return new ServingLora(loaded.config, planned.plan.spec, loraParamsOf(planned.plan));
  });
  const prompts = ['Once upon a time', 'The cat', 'Lily wanted to play with her friend in the park', 'One day', 'Tom'];
  const requests = prompts.flatMap((p, i) => [{ ids: tokenizer.encode(p), a: i % 5 === 4 ? undefined : i % 4 }, { ids: tokenizer.encode(p), a: (i + 1) % 4 }]);
  const maxNewTokens = 12;
  const expected: number[][] = [];
  for (const r of requests) {
    const merged = r.a === undefined ? { weights: loaded.weights } : mergedWeightArrays(model, adapters[r.a]);
    assert.ok(merged.weights, merged.reason);
    const engine = await OrtLlama.create(loaded.config, merged.weights, { threads: 1 });
    expected.push((await generateOrt(engine, r.ids, { maxNewTokens, temperature: 0 })).generatedIds);
    await engine.dispose();
  }
  assert.notDeepEqual(expected[0], expected[1], 'the adapters change the tokens');
  // Rows join at different steps (continuous batching): row r joins at step r % 3. The same
  // engine in a worker thread (what a node runs) gives the same tokens.
  const thread = await ServingThread.create(loaded.config, loaded.weights, { threads: 1 });
  t.after(() => thread.dispose());
  const decodeAll = async <S>(engine: OrtServing<S>): Promise<number[][]> => {
    const live = requests.map((r) => ({
      loop: new GenerationLoop(loaded.config, r.ids, { maxNewTokens, temperature: 0 }),
      sequence: engine.sequence(r.ids.length + maxNewTokens, r.a === undefined ? undefined : loras[r.a]),
      next: r.ids as number[] | undefined,
    }));
    for (let step = 0; live.some((l) => l.next !== undefined); step++) {
      const rows = live.filter((l, r) => l.next !== undefined && r % 3 <= step);
      const logits = await engine.step(rows.map((l) => ({ ids: l.next as number[], sequence: l.sequence })));
      rows.forEach((l, i) => { l.next = l.loop.take(logits[i]); });
    }
    for (const l of live) engine.free?.(l.sequence);
    return live.map((l) => l.loop.result().generatedIds);
  };
  assert.deepEqual(await decodeAll(serving), expected);
  assert.deepEqual(await decodeAll(thread), expected);
  // A freed sequence cannot step; the worker reports its errors typed.
  const freed = thread.sequence(4, loras[0]);
  thread.free(freed);
  await assert.rejects(thread.step([{ ids: [1], sequence: freed }]), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_INPUT_INVALID');
  await assert.rejects(thread.step([{ ids: [loaded.config.vocabSize], sequence: thread.sequence(4) }]), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_INPUT_INVALID');
  // A row past its capacity is refused, typed.
  const full = serving.sequence(2);
  await assert.rejects(serving.step([{ ids: [1, 2, 3], sequence: full }]), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_INPUT_INVALID');
  await assert.rejects(serving.step([{ ids: [loaded.config.vocabSize], sequence: serving.sequence(4) }]), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_INPUT_INVALID');
  for (const a of adapters) a.dispose();
  model.dispose();
});
