// The serving scheduler on stories260K: earliest deadline admitted first (within a tenant; tenants
// take turns), requests waiting
// while the KV budget is reserved, an LRU of resident adapters that never unloads one in use.
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { AdapterRegistry } from '../../cloud-node/serving/adapter-registry.ts';
import type { ServedAdapterRecord } from '../../cloud-node/serving/adapter-registry.ts';
import { ResidentAdapters } from '../../cloud-node/serving/resident-adapters.ts';
import { ServingScheduler } from '../../cloud-node/serving/scheduler.ts';
import { generate, initBackend, LlamaModel, loadAdapter, loadModelFolder, tf } from '../../model/index.ts';
import type { PeftAdapter } from '../../model/index.ts';
import { STORIES_DIR, tempDir } from './helpers.ts';
import { writeTestAdapters } from './serving-fixtures.ts';

let model: LlamaModel;
let dirs: string[];
const record = (i: number): ServedAdapterRecord => ({ name: `a${i}`, tenant: 't', shared: false, peftType: 'LORA', bytes: 0, sha256: String(i), baseContentHash: '', createdAt: '' });

before(async () => {
  await initBackend({ backend: 'wasm' });
  dirs = await writeTestAdapters(await tempDir(), 3);
  model = LlamaModel.fromArrays((await loadModelFolder(STORIES_DIR)).config, (await loadModelFolder(STORIES_DIR)).weights);
});
after(() => model.dispose());

describe('serving scheduler', () => {
  it('admits the earliest deadline first and keeps the KV budget', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const probe = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1, maxBatch: 8, maxQueue: 8 });
    const one = probe.kvBytesOf(4, 4);
    // Room for exactly one request at a time: the order of admission is the order of finishing.
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: one, maxBatch: 8, maxQueue: 8 });
    const finished: string[] = [];
    const now = Date.now();
    const submit = (name: string, deadline: number | undefined) => scheduler.submit({ promptIds: [1, 400, 50, 7], maxTokens: 4, temperature: 0, topP: 1, seed: 0, deadline, ignoreEos: true })
      .then((o) => { finished.push(name); assert.ok(scheduler.kvBytesReserved <= one); return o; });
    const all = [submit('none', undefined), submit('late', now + 60_000), submit('soon', now + 1_000), submit('past', now - 1)];
    const outcomes = await Promise.all(all);
    // The first was admitted before the others arrived; the rest by deadline, none last.
    assert.deepEqual(finished, ['none', 'past', 'soon', 'late']);
    assert.equal(outcomes[3].deadlineMissed, true);
    assert.equal(outcomes[1].deadlineMissed, false);
    assert.equal(scheduler.kvBytesReserved, 0);
    assert.deepEqual(outcomes[0].generatedIds, generate(model, [1, 400, 50, 7], { maxNewTokens: 4, temperature: 0, stopTokenIds: [] }).generatedIds);
    await assert.rejects(scheduler.submit({ promptIds: [1, 2, 3, 4, 5], maxTokens: 4, temperature: 0, topP: 1, seed: 0 }), { code: 'TANDEM_RESOURCE_EXHAUSTED' });
    resident.dispose();
  });

  it("ends only the request whose onToken throws: the others in its batch finish, and the scheduler serves the next", async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1 << 30, maxBatch: 8, maxQueue: 8 });
    const request = { promptIds: [1, 400, 50, 7], maxTokens: 4, temperature: 0, topP: 1, seed: 0, ignoreEos: true };
    const boom = new Error('onToken failed');
    const failing = scheduler.submit({ ...request, onToken: () => { throw boom; } });
    const others = [scheduler.submit(request), scheduler.submit({ ...request, promptIds: [1, 9, 8] })];
    await assert.rejects(failing, (err) => err === boom);
    const want = generate(model, [1, 400, 50, 7], { maxNewTokens: 4, temperature: 0, stopTokenIds: [] }).generatedIds;
    const [a] = await Promise.all(others);
    assert.deepEqual(a.generatedIds, want);
    assert.deepEqual((await scheduler.submit(request)).generatedIds, want, 'served after the failure');
    assert.equal(scheduler.kvBytesReserved, 0, 'the failed request freed its cache');
    resident.dispose();
  });

  it('admits tenant by tenant: a flood of one tenant, even with earlier deadlines, does not keep another waiting; each tenant\'s queue is bounded', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const probe = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1, maxBatch: 8, maxQueue: 8 });
    const one = probe.kvBytesOf(4, 2);
    // One request at a time, so the order of finishing is the order of admission.
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: one, maxBatch: 8, maxQueue: 16, maxQueuePerTenant: 6 });
    const finished: string[] = [];
    const now = Date.now();
    const submit = (tenant: string, name: string, deadline?: number) => scheduler.submit({ tenant, promptIds: [1, 400, 50, 7], maxTokens: 2, temperature: 0, topP: 1, seed: 0, deadline, ignoreEos: true })
      .then(() => { finished.push(name); });
    // mallory sends seven with a deadline already passed (the first is admitted at once, six
    // wait: her bound), alice two without one, after them.
    const all = [0, 1, 2, 3, 4, 5, 6].map((i) => submit('mallory', `m${i}`, now - 1));
    await assert.rejects(submit('mallory', 'm7', now - 1), { code: 'TANDEM_QUOTA_EXCEEDED' }, 'mallory is over her waiting bound');
    all.push(submit('alice', 'a0'), submit('alice', 'a1'));
    await Promise.all(all);
    // m0 was admitted at once; then the tenants take turns, whatever mallory's deadlines say.
    assert.deepEqual(finished, ['m0', 'a0', 'm1', 'a1', 'm2', 'm3', 'm4', 'm5', 'm6']);
    resident.dispose();
  });

  it('close() while a request\'s adapter is loading ends that request too, and releases the adapter', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1 << 30, maxBatch: 8, maxQueue: 8 });
    const pending = scheduler.submit({ tenant: 't', adapter: record(1), promptIds: [1, 400, 50, 7], maxTokens: 2, temperature: 0, topP: 1, seed: 0 });
    scheduler.close();
    const hung = new Promise((_, reject) => setTimeout(() => reject(new Error('the request never settled')), 10_000).unref());
    await assert.rejects(Promise.race([pending, hung]), { code: 'TANDEM_MODEL_NOT_READY' });
    await scheduler.drained();
    assert.equal(scheduler.kvBytesReserved, 0);
    // a1 is not in use any more: two other adapters at capacity 2 unload it.
    for (const i of [0, 2]) (await resident.acquire(record(i))).release();
    assert.equal(resident.count, 2, 'the adapter was released');
    resident.dispose();
  });

  it('the running requests keep decoding while a newcomer\'s adapter loads', async () => {
    let opened = false;
    let openGate!: () => void;
    const gate = new Promise<void>((r) => { openGate = r; });
    const open = (): void => {
      opened = true;
      openGate();
    };
    let loadsStarted = 0;
    // Loading a1 takes as long as the test says (a large adapter read from a slow disk).
    class SlowLoads extends ResidentAdapters {
      override async acquire(r: ServedAdapterRecord): Promise<{ adapter: PeftAdapter; release: () => void }> {
        loadsStarted++;
        await gate;
        return super.acquire(r);
      }
    }
    const resident = new SlowLoads(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1 << 24, maxBatch: 8, maxQueue: 8 });
    let tokensWhileLoading = 0;
    let second: Promise<{ generatedIds: number[] }> | undefined;
    const first = scheduler.submit({
      promptIds: [1, 400, 50], maxTokens: 40, temperature: 0, topP: 1, seed: 0, ignoreEos: true,
      onToken: () => {
        second ??= scheduler.submit({ tenant: 't', adapter: record(1), promptIds: [1, 400, 50, 7], maxTokens: 4, temperature: 0, topP: 1, seed: 0, ignoreEos: true });
        if (loadsStarted > 0 && !opened) tokensWhileLoading++;
        if (tokensWhileLoading === 8) open();
      },
    });
    // Without the loads off the step loop, nothing would step while a1 loads: open the gate after a while anyway.
    const timer = setTimeout(() => open(), 5_000);
    const a = await first;
    const b = await (second as Promise<{ generatedIds: number[] }>);
    clearTimeout(timer);
    assert.ok(tokensWhileLoading >= 8, `the running request decoded ${tokensWhileLoading} tokens while the adapter loaded`);
    // With nothing else running, a request for the base does not wait for another's adapter to load either.
    let reopen!: () => void;
    const slow = new Promise<void>((r) => { reopen = r; });
    const loadingOnly = new (class extends ResidentAdapters {
      override async acquire(r: ServedAdapterRecord): Promise<{ adapter: PeftAdapter; release: () => void }> {
        await slow;
        return super.acquire(r);
      }
    })(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const lone = new ServingScheduler({ model, adapters: loadingOnly, kvBudgetBytes: 1 << 24, maxBatch: 8, maxQueue: 8 });
    const waiting = lone.submit({ tenant: 't', adapter: record(2), promptIds: [1, 400], maxTokens: 2, temperature: 0, topP: 1, seed: 0, ignoreEos: true });
    await new Promise((r) => setTimeout(r, 20));
    const base = await Promise.race([
      lone.submit({ promptIds: [1, 400], maxTokens: 2, temperature: 0, topP: 1, seed: 0, ignoreEos: true }),
      new Promise<undefined>((r) => setTimeout(() => r(undefined), 5_000)),
    ]);
    assert.ok(base !== undefined, 'the base request finished while the adapter was still loading');
    reopen();
    await waiting;
    loadingOnly.dispose();
    assert.deepEqual(a.generatedIds, generate(model, [1, 400, 50], { maxNewTokens: 40, temperature: 0, stopTokenIds: [] }).generatedIds);
    const adapter = await loadAdapter(model, dirs[1]);
    assert.deepEqual(b.generatedIds, generate(model, [1, 400, 50, 7], { maxNewTokens: 4, temperature: 0, stopTokenIds: [], hooks: adapter.hooks }).generatedIds, 'the late request with its adapter is exact');
    adapter.dispose();
    assert.equal(scheduler.kvBytesReserved, 0);
    resident.dispose();
  });

  it('refuses beyond the node\'s queue with a retryable 503', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const probe = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1, maxBatch: 8, maxQueue: 8 });
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: probe.kvBytesOf(4, 2), maxBatch: 8, maxQueue: 2, maxQueuePerTenant: 2 });
    const submit = (tenant: string) => scheduler.submit({ tenant, promptIds: [1, 400, 50, 7], maxTokens: 2, temperature: 0, topP: 1, seed: 0, ignoreEos: true });
    const running = [submit('a'), submit('b'), submit('c')];
    await assert.rejects(submit('d'), (e: { code: string; status?: number }) => e.code === 'TANDEM_MODEL_BUSY');
    await Promise.all(running);
    resident.dispose();
  });

  it('loads adapters on demand and unloads the least recently used one not in use', async () => {
    const counts: number[] = [];
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2, (n) => counts.push(n));
    const before = tf.memory().numTensors;
    const x = await resident.acquire(record(0));
    const y = await resident.acquire(record(1));
    const z = await resident.acquire(record(2));
    assert.equal(resident.count, 3, 'all three are in use: none is unloaded');
    x.release();
    assert.equal(resident.count, 2, 'a0 was the least recently used');
    const y2 = await resident.acquire(record(1));
    assert.equal(resident.loads, 3, 'a1 was still resident');
    y.release();
    y2.release();
    z.release();
    await (await resident.acquire(record(0))).release();
    assert.equal(resident.loads, 4, 'a0 was loaded again');
    assert.equal(resident.count, 2);
    resident.drop(record(0));
    resident.dispose();
    assert.equal(tf.memory().numTensors, before, 'unloaded adapters free their tensors');
    assert.ok(counts.includes(3));
  });

  it('an adapter deleted while it loads serves the requests that waited for it, then leaves memory', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const before = tf.memory().numTensors;
    const first = resident.acquire(record(1));
    const second = resident.acquire(record(1));
    resident.drop(record(1));
    const [a, b] = await Promise.all([first, second]);
    assert.equal(a.adapter, b.adapter, 'one load for both');
    assert.equal(resident.count, 0, 'the deleted adapter is not resident');
    assert.ok(tf.memory().numTensors > before, 'its tensors live while it is in use');
    a.release();
    assert.ok(tf.memory().numTensors > before, 'one request still uses it');
    b.release();
    assert.equal(tf.memory().numTensors, before, 'unloaded when the last request ended');
    // A request after the delete loads it afresh (were it uploaded again under the same hash).
    const c = await resident.acquire(record(1));
    assert.equal(resident.loads, 2);
    assert.equal(resident.count, 1);
    c.release();
    resident.dispose();
  });

  it('runs a newcomer\'s long prompt in chunks while the running request keeps decoding', async () => {
    const resident = new ResidentAdapters(model, (r) => dirs[Number(r.name.slice(1))], 2);
    const scheduler = new ServingScheduler({ model, adapters: resident, kvBudgetBytes: 1 << 24, maxBatch: 8, maxQueue: 8, prefillTokensPerStep: 4 });
    const events: string[] = [];
    const longPrompt = [1, 400, 50, 7, 9, 120, 33, 200, 5, 61, 88, 17];
    let second: Promise<{ generatedIds: number[] }> | undefined;
    const first = scheduler.submit({
      promptIds: [1, 400], maxTokens: 8, temperature: 0, topP: 1, seed: 0, ignoreEos: true,
      onToken: () => {
        events.push('A');
        second ??= scheduler.submit({ promptIds: longPrompt, maxTokens: 3, temperature: 0, topP: 1, seed: 0, ignoreEos: true, onToken: () => { events.push('B'); } });
      },
    });
    const a = await first;
    const b = await (second as Promise<{ generatedIds: number[] }>);
    // A's prompt (2 tokens) fits one step; B's 12 take three steps of 4, A decoding meanwhile.
    assert.equal(events.indexOf('B'), 4, events.join(''));
    assert.ok(scheduler.stepRows.slice(1, 4).every((n) => n === 2), `steps ${scheduler.stepRows.join(',')}`);
    assert.deepEqual(a.generatedIds, generate(model, [1, 400], { maxNewTokens: 8, temperature: 0, stopTokenIds: [] }).generatedIds);
    assert.deepEqual(b.generatedIds, generate(model, longPrompt, { maxNewTokens: 3, temperature: 0, stopTokenIds: [] }).generatedIds);
    assert.equal(scheduler.kvBytesReserved, 0);
    resident.dispose();
  });

  it('the registry drops an interrupted upload at open', async () => {
    const state = await tempDir();
    await mkdir(join(state, 'serving', 'adapters', 't', 'half'), { recursive: true });
    const registry = await AdapterRegistry.open(state);
    assert.deepEqual(registry.visibleTo('t'), []);
  });
});
