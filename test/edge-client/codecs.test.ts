// Lossy codecs on the wire: int8 activations forward and f16 gradients backward (with error
// feedback) end a short run within 2% of f32's validation loss.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import type { EdgeTrainOptions } from '../../edge-client/index.ts';
import { initBackend } from '../../model/index.ts';
import { DEMO_DATA, MODEL_ID, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';

describe('codecs per direction', () => {
  let cloud: TestCloud;
  let cache: { dir: string; remove(): Promise<void> };
  before(async () => {
    await initBackend();
    cloud = await startTestCloud();
    cache = await tempDir('cache');
  });
  after(async () => {
    await cloud.close();
    await cache.remove();
  });

  it('int8-block forward and f16 backward: final validation loss within 2% of f32, with fewer bytes on the wire', async () => {
    const run: EdgeTrainOptions = {
      cloud: cloud.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 10, batchSize: 8, seqLen: 32, lr: 1e-2, seed: 7, valFraction: 0.05,
      methods: [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] }], cacheDir: cache.dir,
    };
    const f32 = await trainEdge({ ...run, codecForward: 'f32', codecBackward: 'f32' });
    const lossy = await trainEdge({ ...run, codecForward: 'int8-block', codecBackward: 'f16' });
    assert.equal(lossy.codecs.forward.codec, 'int8-block');
    assert.equal(lossy.codecs.backward.codec, 'f16');
    const a = f32.after!.loss;
    const b = lossy.after!.loss;
    assert.ok(a < f32.before!.loss, `f32 training lowers the validation loss (${f32.before!.loss} → ${a})`);
    assert.ok(Math.abs(b - a) / a <= 0.02, `int8/f16 validation loss ${b} vs f32 ${a}`);
    assert.ok(lossy.wire.upBytesPerToken < f32.wire.upBytesPerToken / 2, `bytes up per token ${lossy.wire.upBytesPerToken} vs ${f32.wire.upBytesPerToken}`);
  });
});
