// Split training with both sides on ONNX Runtime (the cloud's middle in its compute workers,
// the edge's bottom and top in model/train's run) takes the steps local training on ONNX
// Runtime takes, over a real cloud node on loopback with f32 codecs.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startCloudNode } from '../../../cloud-node/index.ts';
import type { CloudNode } from '../../../cloud-node/index.ts';
import { edgeRecipe, trainEdge } from '../../../edge-client/index.ts';
import { initBackend, trainLocal } from '../../../model/index.ts';
import type { MethodSpec } from '../../../model/index.ts';
import { DEMO_DATA, FIXTURE, MODEL_ID, maxAdapterDiff, tempDir } from '../../edge-client/helpers.ts';

const recipe = { steps: 3, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 3 };
const methods: MethodSpec[] = [{ method: 'lora', r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'], layersToTransform: [0, 4], initLoraWeights: false }];

describe('split training equals local training with both sides on ONNX Runtime', () => {
  let node: CloudNode;
  let work: { dir: string; remove(): Promise<void> };

  before(async () => {
    await initBackend();
    work = await tempDir('split-engine');
    node = await startCloudNode({ modelDir: FIXTURE, stateDir: join(work.dir, 'state'), port: 0, logLevel: 'silent', engine: 'ort-cpu' });
  });
  after(async () => {
    await node.close();
    await work.remove();
  });

  it('LoRA on the bottom and top blocks, cut (1, 1): the same losses and adapter within 1e-5', async () => {
    const lines: string[] = [];
    const split = await trainEdge({
      cloud: node.url, key: node.adminKey as string, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods, ...recipe,
      codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: join(work.dir, 'cache'), engine: 'ort-cpu', log: (l) => lines.push(l),
      onEvent: (e) => {
        if (e.type === 'start') lines.push(`start ${e.engine}`);
      },
    });
    assert.match(lines.join('\n'), /^start ort-cpu: LoRA r4/m);
    // The edge's defaults for everything the recipe leaves out, as test/edge-client's reference does.
    const local = await trainLocal({ ...edgeRecipe({ ...recipe }), modelDir: FIXTURE, dataFile: DEMO_DATA, outDir: join(work.dir, 'local'), methods, evaluate: false, engine: 'ort-cpu' });
    assert.equal(split.losses.length, recipe.steps);
    split.losses.forEach((loss, i) => assert.ok(Math.abs(loss - local.losses[i]) <= 1e-5, `step ${i + 1}: split ${loss} vs local ${local.losses[i]}`));
    const diff = maxAdapterDiff(new Map([...local.adapter].map(([k, v]) => [k, v.data])), split.adapter);
    assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
  });
});
