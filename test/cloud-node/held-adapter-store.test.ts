// The held adapters' checkpoints: the whole adapter at creation and at each commit, each
// backward's gradients in a file of their own (a backward does not write the adapter again),
// and a restart that continues exactly: the same step applied gives the same weights.
import assert from 'node:assert/strict';
import { readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { HeldAdapters } from '../../cloud-node/held-adapters.ts';
import { HeldAdapterStore } from '../../cloud-node/state/held-adapter-store.ts';
import { initBackend, LlamaModel, loadModelFolder } from '../../model/index.ts';
import { addHeld, gradientsLike, heldCommit } from './held-helpers.ts';
import { STORIES_DIR, tempDir } from './helpers.ts';

let model: LlamaModel;

before(async () => {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
});
after(() => model.dispose());

describe('held adapter checkpoints', () => {
  it('a backward writes only its gradients; a restart resumes the step exactly; a commit drops the gradient files', async () => {
    const dir = await tempDir();
    const adapters = await HeldAdapters.open(await HeldAdapterStore.open(dir));
    const held = await addHeld(adapters, model, 'alice');
    const sessionId = held.sessionId;
    const heldDir = join(dir, 'held');
    const checkpoint = join(heldDir, `${sessionId}.json`);
    const written = await readFile(checkpoint);
    const grads = [gradientsLike(held, 1), gradientsLike(held, 2)];
    for (const [mb, g] of grads.entries()) {
      held.accumulate(1, mb, g);
      await adapters.saveGradients(held, 1, mb);
    }
    assert.deepEqual(await readFile(checkpoint), written, 'the backwards did not write the adapter again');
    const files = (await readdir(heldDir)).sort();
    assert.deepEqual(files, [`${sessionId}.json`, `${sessionId}.step-1.mb-0.f32`, `${sessionId}.step-1.mb-1.f32`]);
    const floats = held.tensors().reduce((n, t) => n + t.data.length, 0);
    assert.equal((await stat(join(heldDir, files[1]))).size, floats * 4, 'raw float32, the tensors one after another');

    // A node started again on the folder holds the step in progress, and applies it alike.
    const restarted = await HeldAdapters.open(await HeldAdapterStore.open(dir));
    const again = await restarted.get(sessionId, 'alice');
    assert.ok(again !== undefined);
    for (const mb of [0, 1]) assert.deepEqual(again.gradientsOf(1, mb), grads[mb]);
    const original = held.commit(heldCommit(sessionId, 1, 2));
    const resumed = again.commit(heldCommit(sessionId, 1, 2));
    assert.deepEqual(resumed, original);
    assert.deepEqual(again.tensors(), held.tensors(), 'the same weights, bit for bit');
    await restarted.save(again);
    assert.deepEqual(await readdir(heldDir), [`${sessionId}.json`], 'the committed step\'s gradient files are gone');
    await restarted.drop(sessionId, 'alice');
    assert.deepEqual(await readdir(heldDir), []);
  });

  it('gradient files of a step already committed (a kill after the commit\'s checkpoint) are dropped; a truncated one is a typed error', async () => {
    const dir = await tempDir();
    const store = await HeldAdapterStore.open(dir);
    const adapters = await HeldAdapters.open(store);
    const held = await addHeld(adapters, model, 'bob');
    const sessionId = held.sessionId;
    const g = gradientsLike(held, 5);
    held.accumulate(1, 0, g);
    held.commit(heldCommit(sessionId, 1, 1));
    await adapters.save(held);
    // As if the node died between the commit's checkpoint and the removal of the step's gradient file.
    await store.saveGradients(sessionId, 1, 0, g);
    const reopened = await HeldAdapters.open(await HeldAdapterStore.open(dir));
    assert.deepEqual(await readdir(join(dir, 'held')), [`${sessionId}.json`], 'the stale gradient file is removed');
    const found = await reopened.get(sessionId, 'bob');
    assert.equal(found?.gradientsOf(1, 0), undefined);
    assert.throws(() => found?.commit(heldCommit(sessionId, 2, 1)), { code: 'TANDEM_HELD_GRADIENTS_MISSING' }, 'step 1 is not applied twice, nor taken for step 2');

    await writeFile(join(dir, 'held', `${sessionId}.step-2.mb-0.f32`), new Uint8Array(12));
    await assert.rejects(HeldAdapterStore.open(dir).then((s) => s.loadAll()), { code: 'TANDEM_STATE_INVALID' });
  });

  it('a restart during the first step (step 0, before any commit) keeps its gradient files and applies them', async () => {
    const dir = await tempDir();
    const adapters = await HeldAdapters.open(await HeldAdapterStore.open(dir));
    const held = await addHeld(adapters, model, 'carol');
    const sessionId = held.sessionId;
    const g = gradientsLike(held, 9);
    held.accumulate(0, 0, g);
    await adapters.saveGradients(held, 0, 0);
    const restarted = await HeldAdapters.open(await HeldAdapterStore.open(dir));
    assert.deepEqual(await readdir(join(dir, 'held')), [`${sessionId}.json`, `${sessionId}.step-0.mb-0.f32`]);
    const again = await restarted.get(sessionId, 'carol');
    assert.deepEqual(again?.gradientsOf(0, 0), g);
    assert.deepEqual(again?.commit(heldCommit(sessionId, 0, 1)), held.commit(heldCommit(sessionId, 0, 1)));
  });
});
