// The training-cost measurement of the privacy bench: the edge trains under the defenses, the
// trained model is validated with them on, and the attacks face what the trained bottom sends.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LlamaModel, Rng, baseBottom, hiddenNoiseStd, initBackend, labelBatch, loadModelFolder, loadTokenizer, readDataset, trainUnderDefenses } from '../../model/index.ts';
import type { Batch } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const demoData = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
let model: LlamaModel;
let train: Batch[];
let validation: Batch[];

before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(fixture);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const labels = labelBatch(await readDataset(demoData), await loadTokenizer(fixture), 32, 32);
  assert.ok(labels);
  const part = (i: number): Batch => ({ ids: labels.batch.ids.slice(i, i + 8), labels: labels.batch.labels.slice(i, i + 8) });
  train = [part(0), part(8), part(16)];
  validation = [part(24)];
});
after(() => model.dispose());

describe('training under the defenses', () => {
  it('an untrained undefended edge sends the base h_B; the noise defense sends it clipped and noised at the stated scale', async () => {
    const rows = validation[0].ids.slice(0, 4);
    const plain = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: {}, train, validation, steps: 0 });
    const base = baseBottom(model, rows, 1);
    const sent = plain.sent(rows, new Rng(1));
    assert.ok(sent.every((x, i) => Math.abs(x - base[i]) < 1e-5), 'LoRA starts at the base');
    plain.dispose();
    const noisy = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: { noise: { sigma: 2, clip: 0 } }, train, validation, steps: 0 });
    const noise = noisy.applied.noise;
    assert.ok(noise && noise.clip > 0, 'the clip norm was fixed from the first h_B');
    const residual = noisy.sent(rows, new Rng(2)).map((x, i) => x - base[i]);
    let s = 0;
    for (const r of residual) s += r * r;
    // Clipping moves the larger half of the tokens too, so the residual is at least the noise.
    assert.ok(Math.sqrt(s / residual.length) >= 0.9 * hiddenNoiseStd(noise, 64), 'noise of the stated scale is on what is sent');
    assert.ok(noisy.validationLoss > plain.validationLoss, `noise on h_B costs validation loss (${noisy.validationLoss} vs ${plain.validationLoss})`);
    noisy.dispose();
  });

  it('training lowers the validation loss, and a deeper bottom trains at the moved cut', async () => {
    const untrained = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: {}, train, validation, steps: 0 });
    const trained = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: { deeperBottom: 1 }, train, validation, steps: 6, lr: 1e-2 });
    assert.equal(trained.bottom, 2);
    assert.ok(trained.validationLoss < untrained.validationLoss, `trained ${trained.validationLoss}, untrained ${untrained.validationLoss}`);
    untrained.dispose();
    trained.dispose();
    await assert.rejects(trainUnderDefenses({ model, cut: { bottom: 3, top: 1 }, defenses: { deeperBottom: 1 }, train, validation, steps: 1 }), (e: Error & { code?: string }) => e.code === 'TANDEM_AUDIT_INPUT_INVALID');
  });

  it('scores extra validation sets after the same training, each as the validation set would be', async () => {
    const other = [train[2]];
    const run = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: {}, train, validation, extraValidation: { again: validation, other }, steps: 2, lr: 1e-2 });
    const alone = await trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: {}, train, validation: other, steps: 2, lr: 1e-2 });
    try {
      assert.ok(Math.abs(run.extraValidationLoss.again - run.validationLoss) < 1e-6, 'the same set scores the same');
      assert.ok(Math.abs(run.extraValidationLoss.other - alone.validationLoss) < 1e-6, `an extra set scores as its own validation: ${run.extraValidationLoss.other} vs ${alone.validationLoss}`);
      assert.notEqual(run.extraValidationLoss.other, run.validationLoss);
    } finally {
      run.dispose();
      alone.dispose();
    }
    await assert.rejects(trainUnderDefenses({ model, cut: { bottom: 1, top: 1 }, defenses: {}, train, validation, extraValidation: { empty: [] }, steps: 0 }), (e: Error & { code?: string }) => e.code === 'TANDEM_AUDIT_INPUT_INVALID');
  });
});
