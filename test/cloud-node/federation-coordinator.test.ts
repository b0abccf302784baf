// The coordinator in-process with a test clock: a round below its minimum at the deadline is
// retried with a new sample, a round above it completes; DP rounds spend ε and the round that
// would exceed the budget is refused; state survives reopening.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Coordinator, DirectoryFederationStore } from '../../cloud-node/federation/index.ts';
import { SecAggOwner } from '../../model/index.ts';
import { encodeFloat32, encodeUint32 } from '../../protocol/index.ts';
import type { CoordinatorError } from '../../cloud-node/federation/index.ts';
import type { FederationCreate } from '../../protocol/index.ts';

const dirs: string[] = [];
after(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

function body(over: Partial<FederationCreate> = {}): FederationCreate {
  return {
    id: 'c', model: 'm', mode: 'offsite', rounds: 3, owners: ['a', 'b', 'c'], sampleSize: 3, minOwners: 2, localSteps: 1, roundDeadlineSeconds: 10,
    aggregation: 'fedavg', secureAggregation: false,
    adapter: { config: '{"peft_type":"LORA"}', tensors: { 'x.lora_A.weight': { shape: [2], data: encodeFloat32(Float32Array.from([1, 2])) } } },
    ...over,
  };
}

const update = (attempt: number, v: number[], examples = 1) => ({ attempt, examples, loss: 1, values: encodeFloat32(Float32Array.from(v)) });

describe('federation coordinator', () => {
  it('retries a round below its minimum at the deadline, completes one above it, and resumes from disk', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    let now = 1_000_000;
    const c = await Coordinator.open({ stateDir: dir, now: () => now, tickMs: 1e9 });
    await c.create(body());
    await c.submit('c', 'a', 1, update(0, [1, 1], 3));
    now += 11_000;
    await c.tick();
    let s = c.status('c');
    assert.equal(s.round, 1);
    assert.equal(s.attempt, 1, 'one update of a minimum of 2: the round is retried');
    assert.deepEqual(s.current.received, []);
    await assert.rejects(c.submit('c', 'b', 1, update(0, [0, 0])), (e: CoordinatorError) => e.code === 'TANDEM_FED_UPDATE_LATE');
    await c.submit('c', 'a', 1, update(1, [1, 1], 3));
    await c.submit('c', 'b', 1, update(1, [-1, 3], 1));
    now += 11_000;
    await assert.rejects(c.submit('c', 'c', 1, update(1, [0, 0])), (e: CoordinatorError) => e.code === 'TANDEM_FED_UPDATE_LATE');
    await c.tick();
    s = c.status('c');
    assert.equal(s.round, 2);
    assert.deepEqual(s.history[0].participants, ['a', 'b']);
    assert.deepEqual(s.history[0].attempt, 1);
    const g = c.globalAdapter('c').tensors['x.lora_A.weight'].data;
    assert.equal(g, encodeFloat32(Float32Array.from([1 + (3 * 1 - 1) / 4, 2 + (3 * 1 + 3) / 4])));
    c.close();
    const reopened = await Coordinator.open({ stateDir: dir, now: () => now, tickMs: 1e9 });
    assert.deepEqual(reopened.status('c'), s);
    reopened.close();
  });

  it('spends ε per DP round and stops before the round that would exceed the budget', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    const c = await Coordinator.open({ stateDir: dir, tickMs: 1e9 });
    // σ = 1, every owner every round (q = 1), δ = 1e-5: ε ≈ 4.4 after one round, ≈ 6.6 after two: a budget of 6 allows one.
    await c.create(body({ id: 'dp', rounds: 5, dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5, epsilonBudget: 6 } }));
    for (const o of ['a', 'b', 'c']) await c.submit('dp', o, 1, update(0, [10, 0]));
    const s = c.status('dp');
    assert.equal(s.history.length, 1);
    assert.ok(s.epsilon! > 3 && s.epsilon! < 6, `ε ${s.epsilon}`);
    assert.equal(s.state, 'stopped');
    assert.equal(c.assignment('dp', 'a').state, 'stopped');
    c.close();
  });

  it('rejects bad federation settings with the field named', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    const c = await Coordinator.open({ stateDir: dir, tickMs: 1e9 });
    await assert.rejects(c.create(body({ minOwners: 4 })), (e: CoordinatorError) => e.code === 'TANDEM_FED_CONFIG_INVALID' && e.details.field === 'minOwners');
    await assert.rejects(c.create(body({ owners: ['a', 'a'] })), (e: CoordinatorError) => e.details.field === 'owners');
    await assert.rejects(c.create(body({ adapter: { config: '{}', tensors: { k: { shape: [3], data: encodeFloat32(new Float32Array(2)) } } } })), (e: CoordinatorError) => e.details.field === 'adapter.tensors.k.data');
    c.close();
  });

  it('LoRA-aware aggregations: ffa-lora keeps every A, exact-product averages B·A and reports how far naive averaging is', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    const c = await Coordinator.open({ stateDir: dir, tickMs: 1e9 });
    // One LoRA pair: A [1, 2], B [2, 1] (r = 1), so B·A is a 2×2 matrix.
    const adapter = {
      config: '{"peft_type":"LORA"}',
      tensors: { 'm.lora_A.weight': { shape: [1, 2], data: encodeFloat32(Float32Array.from([1, 0])) }, 'm.lora_B.weight': { shape: [2, 1], data: encodeFloat32(Float32Array.from([0, 0])) } },
    };
    // Flat order is sorted keys: A (2 values), then B (2 values).
    await c.create(body({ id: 'ffa', aggregation: 'ffa-lora', owners: ['a', 'b'], sampleSize: 2, adapter, fedproxMu: 0.1 }));
    const assigned = c.assignment('ffa', 'a');
    assert.equal(assigned.aggregation, 'ffa-lora');
    assert.equal(assigned.fedproxMu, 0.1);
    await c.submit('ffa', 'a', 1, update(0, [5, 5, 1, 2], 1));
    await c.submit('ffa', 'b', 1, update(0, [-5, 5, 3, 4], 3));
    const ffa = c.globalAdapter('ffa').tensors;
    assert.equal(ffa['m.lora_A.weight'].data, encodeFloat32(Float32Array.from([1, 0])), 'A stays frozen whatever the owners sent');
    assert.equal(ffa['m.lora_B.weight'].data, encodeFloat32(Float32Array.from([(1 + 9) / 4, (2 + 12) / 4])));

    await c.create(body({ id: 'exact', aggregation: 'exact-product', owners: ['a', 'b'], sampleSize: 2, adapter }));
    // a ends at A (1, 0), B (1, 0)ᵀ; b at A (0, 1), B (0, 1)ᵀ: mean(B·A) = diag(½, ½) (rank 2), mean(B)·mean(A) = ¼·[[1,1],[1,1]].
    await c.submit('exact', 'a', 1, update(0, [0, 0, 1, 0], 1));
    await c.submit('exact', 'b', 1, update(0, [-1, 1, 0, 1], 1));
    const h = c.status('exact').history[0];
    assert.ok(h.lora, 'the round records the LoRA figures');
    // Rank 1 keeps one of the two equal singular values: error 1/√2; naive averaging: ‖diag(½,½) − ¼·J‖/‖diag(½,½)‖ = 1/√2 too, but a different matrix.
    assert.ok(Math.abs(h.lora!.refactorError - Math.SQRT1_2) < 1e-3, JSON.stringify(h.lora));
    assert.ok(Math.abs(h.lora!.naiveError - Math.SQRT1_2) < 1e-3, JSON.stringify(h.lora));
    c.close();
  });

  it('refuses a cut outside split mode, a bad cut or μ, and exact-product under secure aggregation, DP or over its work bound', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    const c = await Coordinator.open({ stateDir: dir, tickMs: 1e9 });
    const field = (f: string) => (e: CoordinatorError) => e.code === 'TANDEM_FED_CONFIG_INVALID' && e.details.field === f;
    await assert.rejects(c.create(body({ cut: { bottom: 1, top: 1 } })), field('cut'));
    await assert.rejects(c.create(body({ mode: 'split', cut: { bottom: -1, top: 1 } })), field('cut.bottom'));
    await assert.rejects(c.create(body({ fedproxMu: -1 })), field('fedproxMu'));
    await assert.rejects(c.create(body({ fedproxMu: Number.NaN })), field('fedproxMu'));
    await assert.rejects(c.create(body({ aggregation: 'exact-product', secureAggregation: true })), field('aggregation'));
    await assert.rejects(c.create(body({ aggregation: 'exact-product', dp: { clipNorm: 1, noiseMultiplier: 1, delta: 1e-5, epsilonBudget: 10 } })), field('aggregation'));
    // exact-product's dense B·A per owner (here 16384 × 16384) is bounded before any round runs.
    const wide = {
      config: '{"peft_type":"LORA"}',
      tensors: { 'm.lora_A.weight': { shape: [1, 16384], data: encodeFloat32(new Float32Array(16384)) }, 'm.lora_B.weight': { shape: [16384, 1], data: encodeFloat32(new Float32Array(16384)) } },
    };
    await assert.rejects(c.create(body({ id: 'wide', aggregation: 'exact-product', adapter: wide })), (e: CoordinatorError) => field('aggregation')(e) && /over the limit of 134217728/.test(e.message));
    await c.create(body({ id: 'wide-ffa', aggregation: 'ffa-lora', adapter: wide }));
    const s = await c.create(body({ id: 'sp', mode: 'split', cut: { bottom: 1, top: 2 } }));
    assert.equal(s.mode, 'split');
    assert.deepEqual(c.assignment('sp', 'a').cut, { bottom: 1, top: 2 });
    c.close();
  });

  it('refuses a reported loss past 1e6, whose weighted mean could overflow to NaN (found by review)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
    dirs.push(dir);
    const c = await Coordinator.open({ stateDir: dir, tickMs: 1e9 });
    await c.create(body({ owners: ['a', 'b'], sampleSize: 2 }));
    const shape = (field: string) => (e: CoordinatorError) => e.code === 'TANDEM_FED_UPDATE_SHAPE' && e.details.field === field;
    await assert.rejects(c.submit('c', 'a', 1, { ...update(0, [1, 1], 2), loss: 1e308 }), shape('loss'));
    await assert.rejects(c.submit('c', 'a', 1, { ...update(0, [1, 1], 2), validation: { loss: -1e308 } }), shape('validation'));
    await c.submit('c', 'a', 1, { ...update(0, [1, 1], 2), loss: 1e6 });
    await c.submit('c', 'b', 1, { ...update(0, [1, 1], 2), loss: -1e6 });
    assert.equal(c.status('c').history[0].loss, 0);
    c.close();
  });

  describe('owners taken as gone', () => {
    /** A coordinator on a fresh state directory with a test clock; `shared` as a cluster's store is. */
    async function open(shared = false): Promise<{ c: Coordinator; advance: (ms: number) => Promise<void> }> {
      const dir = await mkdtemp(join(tmpdir(), 'tandem-coord-'));
      dirs.push(dir);
      let now = 1_000_000;
      const store = new DirectoryFederationStore(dir);
      if (shared) Object.defineProperty(store, 'shared', { value: true });
      const c = await Coordinator.open({ store, now: () => now, tickMs: 1e9 });
      return { c, advance: async (ms) => { now += ms; await c.tick(); } };
    }

    it('closes a round once every owner it waits on took it up and has been silent for the owner timeout, before the deadline', async () => {
      const { c, advance } = await open();
      await c.create(body({ roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5 }));
      await c.submit('c', 'a', 1, update(0, [1, 1]));
      await c.submit('c', 'b', 1, update(0, [3, 3]));
      await advance(30_000);
      assert.equal(c.status('c').round, 1, 'c has not called in the round: it may still be starting, and is waited for');
      assert.equal(c.assignment('c', 'c').ownerTimeoutSeconds, 5);
      await advance(4_000);
      assert.equal(c.status('c').round, 1, 'c took the round up and has been silent 4 s of its 5');
      await advance(2_000);
      const s = c.status('c');
      assert.equal(s.round, 2, 'c silent past its timeout: the round closed with a and b');
      assert.deepEqual(s.history[0].participants, ['a', 'b']);
      assert.deepEqual(s.history[0].sampled, ['a', 'b', 'c']);
      c.close();
    });

    it('waits for an owner that keeps calling, and retries at once a round whose missing owners are gone below its minimum', async () => {
      const { c, advance } = await open();
      await c.create(body({ roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5 }));
      c.assignment('c', 'c');
      await c.submit('c', 'a', 1, update(0, [1, 1]));
      for (let i = 0; i < 10; i++) {
        await advance(3_000);
        assert.deepEqual(c.alive('c', 'b', 1, 0), { federation: 'c', round: 1, attempt: 0, state: 'open', current: true });
      }
      assert.equal(c.status('c').attempt, 0, 'b keeps beating: 30 s on, the round still waits (c alone silent is not enough)');
      await advance(6_000);
      const s = c.status('c');
      assert.equal(s.round, 1);
      assert.equal(s.attempt, 1, 'b and c gone, one update of a minimum of 2: retried with a new sample');
      assert.deepEqual(c.alive('c', 'a', 1, 0), { federation: 'c', round: 1, attempt: 1, state: 'open', current: false }, 'the heartbeat of a past attempt says it is not current');
      assert.throws(() => c.alive('c', 'mallory', 1, 1), (e: CoordinatorError) => e.code === 'TANDEM_FED_NOT_INVITED');
      c.close();
    });

    it('does not take owners as gone on a store other gateways write (their calls are not seen here)', async () => {
      const { c, advance } = await open(true);
      await c.create(body({ roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5 }));
      c.assignment('c', 'c');
      await c.submit('c', 'a', 1, update(0, [1, 1]));
      await c.submit('c', 'b', 1, update(0, [3, 3]));
      await advance(60_000);
      assert.equal(c.status('c').round, 1);
      await advance(541_000);
      assert.equal(c.status('c').round, 2, 'the deadline still closes it');
      c.close();
    });

    it('under secure aggregation, begins the reveal once the owners that shared keys but sent no masked input are gone', async () => {
      const { c, advance } = await open();
      await c.create(body({ roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5, secureAggregation: true }));
      const view = c.secAggView('c', 'a', 1);
      const owners = new Map(['a', 'b', 'c'].map((o) => [o, new SecAggOwner(o, { round: view.label, length: 2, threshold: view.threshold, owners: 3 })]));
      for (const [o, s] of owners) await c.advertise('c', o, 1, { attempt: 0, ...s.advertise() });
      const advertised = c.secAggView('c', 'a', 1).advertised;
      for (const [o, s] of owners) await c.share('c', o, 1, { attempt: 0, shares: s.shareKeys(advertised) });
      for (const o of ['a', 'b']) {
        const masked = owners.get(o)!.maskInput(Float32Array.from([1, 2]), c.secAggView('c', o, 1).shares);
        await c.submit('c', o, 1, { attempt: 0, examples: 1, loss: 1, masked: encodeUint32(masked) });
      }
      await advance(4_000);
      assert.equal(c.secAggView('c', 'a', 1).phase, 'masked');
      await advance(2_000);
      const reveal = c.secAggView('c', 'a', 1);
      assert.equal(reveal.phase, 'reveal', 'c gone after sharing: the survivors reveal its mask key');
      assert.deepEqual(reveal.survivors, ['a', 'b']);
      for (const o of ['a', 'b']) await c.reveal('c', o, 1, { attempt: 0, ...owners.get(o)!.reveal(reveal.survivors) });
      const s = c.status('c');
      assert.equal(s.round, 2);
      assert.deepEqual(s.history[0].participants, ['a', 'b']);
      c.close();
    });

    it('refuses an owner timeout outside 1..the round deadline, and defaults to min(60 s, the deadline)', async () => {
      const { c } = await open();
      const field = (e: CoordinatorError) => e.code === 'TANDEM_FED_CONFIG_INVALID' && e.details.field === 'ownerTimeoutSeconds';
      await assert.rejects(c.create(body({ roundDeadlineSeconds: 30, ownerTimeoutSeconds: 31 })), field);
      await assert.rejects(c.create(body({ ownerTimeoutSeconds: 0 })), field);
      await assert.rejects(c.create(body({ ownerTimeoutSeconds: 2.5 })), field);
      await c.create(body({ id: 'long', roundDeadlineSeconds: 600 }));
      await c.create(body({ id: 'short', roundDeadlineSeconds: 20 }));
      assert.equal(c.assignment('long', 'a').ownerTimeoutSeconds, 60);
      assert.equal(c.assignment('short', 'a').ownerTimeoutSeconds, 20);
      c.close();
    });
  });
});
