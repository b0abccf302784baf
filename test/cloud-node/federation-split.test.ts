// A split-mode federation with real processes: one cloud node and three owners, each training
// its round through the cloud's middle blocks (f32 codecs) with FedProx's proximal term. Each
// owner's update equals the same round trained locally on the whole model, and the new global
// adapter is their examples-weighted mean.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { readAdapterFolder, writeAdapterFolder } from '../../edge-client/index.ts';
import { DEFAULT_RECIPE, LlamaModel, constrainLocalRound, createAdapter, initBackend, loadModelFolder, loadTokenizer, openRun, runSteps, saveAdapter } from '../../model/index.ts';
import type { TrainingSpec } from '../../model/index.ts';
import { decodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate, WireAdapter } from '../../protocol/index.ts';
import { STORIES, api, flatOf, run, startCloud, status, tempDir, tenantKey, until } from './federation-processes.ts';

const OWNERS = ['alice', 'bob', 'carol'] as const;
const MU = 0.5;

describe('split-mode federation with real processes', { timeout: 600_000 }, () => {
  it("each owner's split round equals the same local training (f32), with FedProx; the global adapter is their weighted mean", async () => {
    const dir = await tempDir();
    await initBackend({ backend: 'wasm' });
    const loaded = await loadModelFolder(STORIES);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    // LoRA on the edge's blocks of cut (1, 1): block 0 (bottom) and block 4 (top).
    const init = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'], layersToTransform: [0, 4], initLoraWeights: false }], { seed: 5 });
    await saveAdapter(init, join(dir, 'init'));
    init.dispose();
    const adapter = await readAdapterFolder(join(dir, 'init'));

    const data: Record<string, string> = {};
    for (const [i, o] of OWNERS.entries()) {
      const words = [['cat', 'mat'], ['dog', 'park'], ['bird', 'tree']][i];
      data[o] = join(dir, `${o}.jsonl`);
      await writeFile(data[o], `${Array.from({ length: 16 + 8 * i }, (_, k) => JSON.stringify({ text: `the ${words[0]} went to the ${words[1]} ${k}.` })).join('\n')}\n`);
    }
    const cloud = await startCloud(join(dir, 'state'));
    const keys = Object.fromEntries(await Promise.all(OWNERS.map(async (o) => [o, await tenantKey(cloud, o)] as const)));
    const body: FederationCreate = {
      id: 'split', model: 'stories260K', mode: 'split', cut: { bottom: 1, top: 1 }, adapter, rounds: 1, owners: [...OWNERS], sampleSize: 3, minOwners: 3,
      localSteps: 3, fedproxMu: MU, roundDeadlineSeconds: 300, aggregation: 'fedavg', secureAggregation: false,
    };
    const created = await api(cloud, 'POST', '/v1/federations', cloud.adminKey, body);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    // No --model: split mode downloads the edge part of cut (1, 1) from the cloud.
    const procs = OWNERS.map((o) => run(['edge', 'federate', '--cloud', cloud.url, '--key', keys[o], '--federation', 'split', '--data', data[o], '--work', join(dir, `w-${o}`),
      '--poll', '100', '--batch-size', '4', '--seq-len', '16', '--lr', '0.01', '--codec', 'f32', '--backend', 'wasm', '--json']));
    await Promise.all(procs.map((p) => p.waitFor(/"event":"done"/, 300_000)));
    const done = await until(async () => {
      const s = await status(cloud, 'split');
      return s.state === 'done' ? s : undefined;
    }, 'the round');
    assert.deepEqual(done.history[0].participants, [...OWNERS]);
    assert.equal(done.mode, 'split');

    const before = flatOf(adapter);
    const after = flatOf((await api(cloud, 'GET', '/v1/federations/split/adapter', cloud.adminKey)).json as unknown as WireAdapter);
    const lines = procs.map((p) => p.lines.map((l) => JSON.parse(l) as { event: string; accepted: boolean; examples: number; update: string }).find((l) => l.event === 'round' && l.accepted)!);
    const tokenizer = await loadTokenizer(STORIES);
    await writeAdapterFolder(adapter, join(dir, 'global'));
    for (const [i, o] of OWNERS.entries()) {
      // The same round locally: the whole model, the global adapter, the recipe and seed the CLI gives round 1 attempt 0.
      const spec: TrainingSpec = {
        model, tokenizer, modelHash: loaded.contentHash, dataFile: data[o], baseModel: STORIES, methods: [], adapterDir: join(dir, 'global'), evaluate: true,
        recipe: { ...DEFAULT_RECIPE, batchSize: 4, seqLen: 16, lr: 0.01, warmupSteps: 0, valFraction: 0.2, steps: 3, seed: 1009 },
      };
      const state = await openRun(spec);
      const undo = constrainLocalRound(state.adapter, { fedproxMu: MU });
      const local = await runSteps(state, spec).finally(() => {
        undo();
        state.optimizer.dispose();
        state.adapter.dispose();
      });
      const want = Object.keys(adapter.tensors).sort().flatMap((k) => [...local.adapter.get(k)!.data]).map((v, j) => v - before[j]);
      const got = decodeFloat32(lines[i].update)!;
      assert.equal(got.length, want.length);
      let max = 0;
      want.forEach((v, j) => (max = Math.max(max, Math.abs(v - got[j]))));
      assert.ok(max <= 1e-5, `${o}: split and local updates differ by ${max}`);
      assert.ok(got.some((v) => v !== 0), `${o}'s update is not zero`);
    }
    const total = lines.reduce((s, l) => s + l.examples, 0);
    for (let j = 0; j < before.length; j++) {
      const want = before[j] + lines.reduce((s, l) => s + (l.examples / total) * decodeFloat32(l.update)![j], 0);
      assert.ok(Math.abs(after[j] - want) <= 1e-6 + 1e-5 * Math.abs(want), `value ${j}: ${after[j]} vs ${want}`);
    }
    model.dispose?.();
    cloud.proc.child.kill('SIGTERM');
    await cloud.proc.exited;
  });
});
