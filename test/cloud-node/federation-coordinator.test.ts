// The coordinator in-process with a test clock: a round below its minimum at the deadline is
// retried with a new sample, a round above it completes; DP rounds spend ε and the round that
// would exceed the budget is refused; state survives reopening.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Coordinator } from '../../cloud-node/federation/index.ts';
import { encodeFloat32 } from '../../protocol/index.ts';
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
});
