// Held adapters' checkpoints in JetStream, as two gateways share them: one reads what the
// other wrote (the step in progress included, the first step's too) and applies it alike; a
// write from a copy that is behind is refused, every write queued behind it too, and that copy
// read again; a move JetStream did not acknowledge but made stands; a close racing another
// gateway's write removes everything; the tenant's bytes count across gateways; a copy idle
// here is let go; and a removed checkpoint leaves nothing in either stream, however many steps
// were written.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { Bucket } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { HeldAdapter, HeldAdapters } from '../../cloud-node/held-adapters.ts';
import { HELD_HEADS_BUCKET, HELD_OBJECTS_BUCKET, JetStreamHeldAdapterStore } from '../../cloud-node/state/jetstream-held-adapter-store.ts';
import { initBackend, LlamaModel, loadModelFolder } from '../../model/index.ts';
import { addHeld, gradientsLike, heldCommit } from '../cloud-node/held-helpers.ts';
import { STORIES_DIR } from '../cloud-node/helpers.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';

async function messages(nc: NatsConnection): Promise<{ heads: number; objects: number }> {
  const jsm = await jetstreamManager(nc);
  return {
    heads: (await jsm.streams.info(`KV_${HELD_HEADS_BUCKET}`)).state.messages,
    objects: (await jsm.streams.info(`OBJ_${HELD_OBJECTS_BUCKET}`)).state.messages,
  };
}

describe('held adapter checkpoints in JetStream, shared by two gateways', () => {
  let nats: TestNatsServer;
  let nc: NatsConnection;
  let model: LlamaModel;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    const loaded = await loadModelFolder(STORIES_DIR);
    model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    nats = await startNatsServer();
    nc = await connectNats(nats.url, 'test-held-checkpoints', 'gateway');
  });
  /** Two gateways' sets over the same buckets, and alice's new session added on the first. */
  async function twoGateways(): Promise<{ a: HeldAdapters; b: HeldAdapters; held: HeldAdapter; sessionId: string }> {
    const a = await HeldAdapters.open(await JetStreamHeldAdapterStore.open(nc));
    const b = await HeldAdapters.open(await JetStreamHeldAdapterStore.open(nc));
    const held = await addHeld(a, model, 'alice');
    return { a, b, held, sessionId: held.sessionId };
  }
  after(async () => {
    model.dispose();
    await nc?.drain();
    await nats?.close();
  });

  it('a second gateway reads the step in progress and applies it alike; the first, behind, is refused and reads it again', async () => {
    const { a, b, held, sessionId } = await twoGateways();
    const grads = [gradientsLike(held, 1), gradientsLike(held, 2)];
    // The first backward on a, the second on b (the edge moved between them).
    held.accumulate(1, 0, grads[0]);
    await a.saveGradients(held, 1, 0);
    const onB = await b.get(sessionId, 'alice');
    assert.ok(onB !== undefined, 'b reads the checkpoint a wrote');
    assert.deepEqual(onB.gradientsOf(1, 0), grads[0]);
    onB.accumulate(1, 1, grads[1]);
    await b.saveGradients(onB, 1, 1);
    const expected = HeldAdapter.fromSnapshot(structuredClone(onB.snapshot()));
    const answer = onB.commit(heldCommit(sessionId, 1, 2));
    await b.save(onB);

    // a's copy is behind: a write from it is refused, and the copy is dropped.
    held.accumulate(2, 0, grads[0]);
    await assert.rejects(a.saveGradients(held, 2, 0), { code: 'TANDEM_HELD_ADAPTER_MOVED' });
    // Read again, it holds b's commit: the same weights as the step applied once, and a repeat answers the same.
    const again = await a.get(sessionId, 'alice');
    assert.ok(again !== undefined && again !== held, 'the copy that was behind is read again');
    assert.equal(again.lastCommitted, 1);
    assert.deepEqual(expected.commit(heldCommit(sessionId, 1, 2)).answer, answer.answer);
    assert.deepEqual(again.tensors(), expected.tensors(), 'the step was applied once, bit for bit');
    assert.deepEqual(again.commit(heldCommit(sessionId, 1, 2)), { answer: answer.answer, applied: false });
    // b's own copy is current: no read.
    assert.equal(await b.get(sessionId, 'alice'), onB);

    assert.equal(await a.bytesOf('alice'), held.bytes, "alice's held bytes, counted from the checkpoints every gateway shares");
    assert.equal(await b.bytesOf('bob'), 0);
    await b.drop(sessionId, 'alice');
    assert.equal(await a.get(sessionId, 'alice'), undefined, 'dropped on b, it is gone for a too');
    assert.equal(await a.bytesOf('alice'), 0);
  });

  it('30 steps committed and the session removed: both streams are empty again (objects and markers purged)', async () => {
    const adapters = await HeldAdapters.open(await JetStreamHeldAdapterStore.open(nc));
    const before = await messages(nc);
    const held = await addHeld(adapters, model, 'carol');
    const sessionId = held.sessionId;
    for (let step = 1; step <= 30; step++) {
      for (const mb of [0, 1]) {
        held.accumulate(step, mb, gradientsLike(held, step * 2 + mb));
        await adapters.saveGradients(held, step, mb);
      }
      held.commit(heldCommit(sessionId, step, 2));
      await adapters.save(held);
    }
    const during = await messages(nc);
    assert.equal(during.heads - before.heads, 1, 'one head per session');
    const reread = await HeldAdapters.open(await JetStreamHeldAdapterStore.open(nc));
    assert.deepEqual((await reread.get(sessionId, 'carol'))?.tensors(), held.tensors());
    await adapters.drop(sessionId, 'carol');
    assert.deepEqual(await messages(nc), before, 'nothing of the session is left in either stream');
  });

  it("the first step's (step 0) gradients checkpointed on one gateway are the other's step in progress", async () => {
    const { a, b, held, sessionId } = await twoGateways();
    const g = gradientsLike(held, 7);
    held.accumulate(0, 0, g);
    await a.saveGradients(held, 0, 0);
    const onB = await b.get(sessionId, 'alice');
    assert.deepEqual(onB?.gradientsOf(0, 0), g);
    onB?.accumulate(0, 1, gradientsLike(held, 8));
    assert.equal(onB?.commit(heldCommit(sessionId, 0, 2)).applied, true);
    await b.drop(sessionId, 'alice');
  });

  it('writes queued behind one that is refused are refused too: nothing is acknowledged that the checkpoint lacks', async () => {
    const { a, b, held, sessionId } = await twoGateways();
    const onB = await b.get(sessionId, 'alice');
    onB?.accumulate(1, 0, gradientsLike(held, 1));
    await b.saveGradients(onB as HeldAdapter, 1, 0);
    // a's copy is behind; two backwards' writes queued on it.
    held.accumulate(1, 1, gradientsLike(held, 2));
    held.accumulate(1, 2, gradientsLike(held, 3));
    const writes = await Promise.allSettled([a.saveGradients(held, 1, 1), a.saveGradients(held, 1, 2)]);
    assert.deepEqual(writes.map((w) => (w.status === 'rejected' ? (w.reason as { code?: string }).code : 'acknowledged')), ['TANDEM_HELD_ADAPTER_MOVED', 'TANDEM_HELD_ADAPTER_MOVED']);
    // Read again, a's copy holds b's backward and neither of its own.
    const again = await a.get(sessionId, 'alice');
    assert.notEqual(again, held);
    assert.ok(again?.gradientsOf(1, 0) !== undefined && again.gradientsOf(1, 1) === undefined && again.gradientsOf(1, 2) === undefined);
    await a.drop(sessionId, 'alice');
  });

  it('a move JetStream made but did not acknowledge stands; a close racing another gateway\'s write removes the head and every object', async () => {
    const before = await messages(nc);
    const { a, b, held, sessionId } = await twoGateways();
    held.accumulate(0, 0, gradientsLike(held, 1));
    held.commit(heldCommit(sessionId, 0, 1));
    // The update lands, its answer is lost (a timeout).
    const update = Bucket.prototype.update;
    Bucket.prototype.update = async function (this: Bucket, ...args: Parameters<Bucket['update']>) {
      await update.apply(this, args);
      throw new Error('TIMEOUT');
    };
    try {
      await a.save(held);
    } finally {
      Bucket.prototype.update = update;
    }
    const onB = await b.get(sessionId, 'alice');
    assert.deepEqual(onB?.tensors(), held.tensors(), 'the commit is in the checkpoint');
    assert.equal(onB?.lastCommitted, 0);

    // a closes the session while b's backward writes: the head b moves is read again and removed.
    const get = Bucket.prototype.get;
    let armed = true;
    Bucket.prototype.get = async function (this: Bucket, ...args: Parameters<Bucket['get']>) {
      const entry = await get.apply(this, args);
      if (armed) {
        armed = false;
        onB?.accumulate(1, 0, gradientsLike(held, 2));
        await b.saveGradients(onB as HeldAdapter, 1, 0);
      }
      return entry;
    };
    try {
      await a.drop(sessionId, 'alice');
    } finally {
      Bucket.prototype.get = get;
    }
    assert.equal(await b.get(sessionId, 'alice'), undefined, 'gone for b too');
    assert.deepEqual(await messages(nc), before, 'nothing of the session is left in either stream');
  });

  it('a copy not used for idleCopyMs is let go here; the checkpoint stays and is read again', async () => {
    const a = await HeldAdapters.open(await JetStreamHeldAdapterStore.open(nc), undefined, { idleCopyMs: 50 });
    const idle = await addHeld(a, model, 'alice');
    const first = idle.sessionId;
    await new Promise((r) => setTimeout(r, 80));
    const second = (await addHeld(a, model, 'alice')).sessionId;
    assert.equal(a.count, 1, 'the idle copy was let go');
    // A backward that was computing on the copy let go is not acknowledged unwritten.
    idle.accumulate(0, 0, gradientsLike(idle, 1));
    await assert.rejects(a.saveGradients(idle, 0, 0), { code: 'TANDEM_HELD_ADAPTER_MOVED' });
    assert.ok((await a.get(first, 'alice')) !== undefined, 'and is read again on use');
    // With no held traffic at all, the copies go too.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(a.count, 0, 'both copies were let go without another use');
    await a.drop(first, 'alice');
    await a.drop(second, 'alice');
    a.close();
  });
});
