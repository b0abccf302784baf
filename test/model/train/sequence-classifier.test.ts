// The sequence classifier (LoRA + score head on mean-pooled final hidden states) learns a
// task the rows' words decide, padding does not change a row's logits, and its flat values
// round-trip (what a federation averages).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LlamaModel, SequenceClassifier, classifiedRows, createAdapter, initBackend, loadModelFolder, loadTokenizer } from '../../../model/index.ts';
import type { ModelError, PeftAdapter } from '../../../model/index.ts';

const STORIES = join(import.meta.dirname, '..', '..', 'fixtures', 'stories260K');
let model: LlamaModel;
let adapter: PeftAdapter;

before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'] }], { seed: 2 });
});
after(() => {
  adapter?.dispose();
  model?.dispose?.();
});

describe('SequenceClassifier', () => {
  it('learns which of two kinds of sentence a row is; padding leaves logits alone; flat values round-trip', async () => {
    const tokenizer = await loadTokenizer(STORIES);
    const kinds = [['the cat was sad and cried', 'a sad dog cried all day', 'lily was sad'], ['the cat was happy and smiled', 'a happy dog played all day', 'lily was happy']];
    const records = Array.from({ length: 24 }, (_, i) => ({ text: `${kinds[i % 2][i % 3]}.`, label: i % 2 }));
    const rows = classifiedRows(tokenizer, records, 24);
    const c = new SequenceClassifier({ model, adapter, numLabels: 2, seed: 1 });
    try {
      const start = c.getFlat();
      const one = c.logits([rows[0]], false).arraySync()[0];
      const padded = c.logits([rows[0], { ids: [...rows[1].ids, ...rows[1].ids, 5, 6, 7], label: 1 }], false).arraySync()[0];
      one.forEach((v, i) => assert.ok(Math.abs(v - padded[i]) < 1e-4, `padding moved logit ${i}: ${v} vs ${padded[i]}`));
      const losses = c.train(rows, { steps: 30, batchSize: 8, lr: 0.01, seed: 3 });
      assert.ok(losses.at(-1)! < losses[0], `loss ${losses[0]} → ${losses.at(-1)}`);
      assert.equal(c.accuracy(rows), 1);
      const trained = c.getFlat();
      assert.ok(trained.some((v, i) => v !== start[i]));
      c.setFlat(start);
      assert.deepEqual(c.getFlat(), start);
      assert.throws(() => c.setFlat(start.subarray(1)), (e: ModelError) => e.code === 'TANDEM_INPUT_INVALID');
    } finally {
      c.dispose();
    }
    assert.throws(() => new SequenceClassifier({ model, adapter, numLabels: 1 }), (e: ModelError) => e.code === 'TANDEM_INPUT_INVALID');
  });
});
