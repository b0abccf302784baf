// A cloud process holding a session's middle LoRA is killed with SIGKILL mid-training and
// started again on the same state folder: the edge reattaches, and the run ends with the
// adapter of an uninterrupted run — no step lost, none applied twice (the held adapter, its
// AdamW state at each commit, and each backward's gradients of the step in progress, are
// checkpointed before the reply).
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { trainEdge } from '../../edge-client/index.ts';
import { initBackend } from '../../model/index.ts';
import type { MethodSpec } from '../../model/index.ts';
import { startCloud, tempDir, tenantKey } from '../cloud-node/federation-processes.ts';
import type { Cloud } from '../cloud-node/federation-processes.ts';
import { DEMO_DATA, MODEL_ID, maxAdapterDiff, trainReference } from './helpers.ts';

const common = { steps: 5, batchSize: 4, seqLen: 32, lr: 5e-3, seed: 5, gradientAccumulationSteps: 2 };
const TARGETS = ['q_proj', 'v_proj'];
const EDGE: MethodSpec = { method: 'lora', r: 4, loraAlpha: 8, targetModules: TARGETS, layersToTransform: [0, 4], initLoraWeights: false };
const MIDDLE: MethodSpec = { method: 'lora', r: 4, loraAlpha: 8, targetModules: TARGETS, layersToTransform: [1, 2, 3] };

describe('a cloud holding a middle LoRA, killed with SIGKILL mid-training', () => {
  it('resumes from its state folder: the run equals an uninterrupted one, step for step', async () => {
    await initBackend();
    const dir = await tempDir();
    const state = join(dir, 'state');
    let cloud: Cloud = await startCloud(state);
    const key = await tenantKey(cloud, 'alice');
    let restarted: Promise<Cloud> | undefined;
    let pendingAtKill: number | undefined;
    try {
      const run = await trainEdge({
        cloud: cloud.url, key, model: MODEL_ID, data: DEMO_DATA, cut: { bottom: 1, top: 1 }, methods: [EDGE], ...common,
        middleLora: { r: 4, alpha: 8, targets: TARGETS }, codecForward: 'f32', codecBackward: 'f32', evaluate: false, cacheDir: join(dir, 'cache'),
        requestTimeoutMs: 8000, retries: 30,
        onEvent: (e) => {
          if (e.type !== 'step' || e.step !== 2 || restarted !== undefined) return;
          // Killed inside step 3, once the cloud has checkpointed (and answered) a backward of it but not its commit.
          const old = cloud;
          restarted = (async () => {
            const held = join(state, 'held');
            // A backward's gradients are checkpointed in a file of their own: <session>.step-3.mb-M.f32.
            for (let i = 0; i < 5000 && pendingAtKill === undefined; i++) {
              const step3 = (await readdir(held)).filter((n) => /\.step-3\.mb-\d+\.f32$/.test(n));
              if (step3.length > 0) pendingAtKill = step3.length;
              else await new Promise((r) => setTimeout(r, 1));
            }
            // A moment more, so that the reply of that backward has reached the edge (its next backward computes).
            await new Promise((r) => setTimeout(r, 20));
            old.proc.child.kill('SIGKILL');
            await old.proc.exited;
            return startCloud(state, old.port, old.adminKey);
          })();
        },
      });
      assert.ok(restarted !== undefined, 'the cloud was killed');
      cloud = await restarted;
      assert.ok(pendingAtKill !== undefined && pendingAtKill >= 1, 'the kill came between a checkpointed backward of a step and its commit');
      assert.equal(run.wire.reattached >= 1, true, 'the edge reattached its session to the restarted cloud');
      const reference = await trainReference({ methods: [EDGE, MIDDLE], ...common });
      assert.equal(run.losses.length, common.steps);
      run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - reference.losses[i]) <= 1e-5, `step ${i + 1}: ${loss} vs ${reference.losses[i]}`));
      const diff = maxAdapterDiff(reference.adapter, run.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
      assert.deepEqual(await readdir(join(state, 'held')), [], 'the closed session\'s adapter checkpoint is removed');
    } finally {
      cloud.proc.child.kill('SIGTERM');
      await cloud.proc.exited;
    }
  });
});
