// Checkpoints and exact resume, the cache of edge parts, the key, and export.
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connectCloud, trainEdge } from '../../edge-client/index.ts';
import type { EdgeError, EdgeTrainOptions } from '../../edge-client/index.ts';
import { exportAdapter, initBackend } from '../../model/index.ts';
import { DEMO_DATA, MODEL_ID, maxAdapterDiff, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';

describe('edge checkpoints, cache and export', () => {
  let cloud: TestCloud;
  let work: { dir: string; remove(): Promise<void> };
  before(async () => {
    await initBackend();
    cloud = await startTestCloud();
    work = await tempDir('resume');
  });
  after(async () => {
    await cloud.close();
    await work.remove();
  });

  it('a run interrupted after a checkpoint resumes to the adapter of the uninterrupted run, and exports as a PEFT folder', async () => {
    const run: EdgeTrainOptions = {
      cloud: cloud.url, key: cloud.key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, steps: 4, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 9,
      methods: [{ method: 'lora', r: 4, targetModules: ['q_proj', 'v_proj'], loraDropout: 0.1 }], evaluate: false, cacheDir: join(work.dir, 'cache'),
    };
    const whole = await trainEdge(run);
    const checkpointDir = join(work.dir, 'ckpt');
    await assert.rejects(
      trainEdge({ ...run, checkpointDir, saveEvery: 2, onEvent: (e) => { if (e.type === 'checkpoint' && e.step === 2) throw new Error('interrupted'); } }),
      /interrupted/,
    );
    const resumed = await trainEdge({ ...run, checkpointDir, saveEvery: 2 });
    assert.equal(resumed.startStep, 2);
    assert.deepEqual(resumed.losses, whole.losses.slice(2));
    assert.ok(maxAdapterDiff(new Map([...whole.adapter].map(([k, v]) => [k, v.data])), resumed.adapter) <= 1e-6);
    await assert.rejects(trainEdge({ ...run, seed: 10, checkpointDir }), (e: EdgeError) => e.code === 'TANDEM_EDGE_CHECKPOINT_MISMATCH');
    const out = join(work.dir, 'peft');
    await exportAdapter({ checkpointDir, outDir: out });
    assert.deepEqual((await readdir(out)).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
  });

  it('a second download comes from the cache; a wrong key is TANDEM_EDGE_AUTH_FAILED', async () => {
    const client = await connectCloud(cloud.url, { key: cloud.key });
    try {
      const cacheDir = join(work.dir, 'cache2');
      const first = await client.downloadEdge(MODEL_ID, { bottom: 1, top: 1 }, cacheDir);
      const second = await client.downloadEdge(MODEL_ID, { bottom: 1, top: 1 }, cacheDir);
      assert.equal(first.cached, false);
      assert.ok(first.downloadedBytes > 0);
      assert.equal(second.cached, true);
      assert.equal(second.dir, first.dir);
    } finally {
      client.close();
    }
    await assert.rejects(connectCloud(cloud.url, { key: 'tdk_wrong' }), (e: EdgeError) => e.code === 'TANDEM_EDGE_AUTH_FAILED');
  });
});
