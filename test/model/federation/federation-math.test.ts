// The federation math: aggregation, LoRA-aware aggregation, secure aggregation with dropout
// recovery, and the DP accountant against published values.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  FederationError,
  RdpAccountant,
  SecAggOwner,
  clipUpdate,
  combineShares,
  coordinateMedian,
  dequantize,
  exactLoraAggregate,
  fedAdamStep,
  fedAvg,
  flatten,
  layoutOf,
  quantize,
  splitSecret,
  trimmedMean,
  unflatten,
  unmaskSum,
} from '../../../model/index.ts';
import type { EncryptedShare, SecAggParams, TensorSet, WeightedUpdate } from '../../../model/index.ts';

function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s ^ (s >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

function randomVector(n: number, seed: number, scale = 1): Float32Array {
  const r = seeded(seed);
  return Float32Array.from({ length: n }, () => r() * scale);
}

describe('aggregation', () => {
  it('FedAvg equals the weighted average computed independently, element by element', () => {
    const updates: WeightedUpdate[] = [randomVector(50, 1), randomVector(50, 2), randomVector(50, 3)].map((values, i) => ({ values, weight: [10, 30, 5][i] }));
    const got = fedAvg(updates);
    for (let i = 0; i < 50; i++) {
      const want = (10 * updates[0].values[i] + 30 * updates[1].values[i] + 5 * updates[2].values[i]) / 45;
      assert.ok(Math.abs(got[i] - want) < 1e-6, `coordinate ${i}: ${got[i]} vs ${want}`);
    }
  });

  it('median and trimmed mean ignore one wild owner, FedAvg does not', () => {
    const honest = [1, 2, 3, 4].map((s) => ({ values: Float32Array.from([1 + s * 0.01, -1]), weight: 1 }));
    const updates = [...honest, { values: Float32Array.from([1e6, 1e6]), weight: 1 }];
    assert.ok(coordinateMedian(updates)[0] < 1.1);
    assert.ok(Math.abs(trimmedMean(updates, 0.2)[1] + 1) < 1e-6);
    assert.ok(fedAvg(updates)[0] > 1000);
  });

  it('refuses non-finite values, mismatched sizes and bad weights with typed errors', () => {
    assert.throws(() => fedAvg([{ values: Float32Array.from([NaN]), weight: 1 }]), (e: FederationError) => e.code === 'TANDEM_FED_UPDATE_NON_FINITE');
    assert.throws(() => fedAvg([{ values: new Float32Array(2), weight: 1 }, { values: new Float32Array(3), weight: 1 }]), (e: FederationError) => e.code === 'TANDEM_FED_UPDATE_SHAPE' && e.field === 'updates[1]');
    assert.throws(() => fedAvg([{ values: new Float32Array(2), weight: 0 }]), (e: FederationError) => e.code === 'TANDEM_FED_AGGREGATION_INVALID');
  });

  it('FedAdam takes a step of size ≈ lr in the direction of a constant pseudo-gradient', () => {
    const delta = Float32Array.from([0.5, -0.5, 0]);
    let state;
    let step: Float32Array = new Float32Array(3);
    for (let r = 0; r < 800; r++) ({ step, state } = fedAdamStep(delta, state, { learningRate: 0.1 }));
    assert.ok(Math.abs(step[0] - 0.1) < 0.005, `step ${step[0]}`);
    assert.ok(step[1] < -0.05);
    assert.equal(step[2], 0);
    assert.equal(state!.round, 800);
  });

  it('flattens and unflattens adapter tensors in one sorted layout', () => {
    const set: TensorSet = { b: { shape: [2], data: Float32Array.from([3, 4]) }, a: { shape: [1, 2], data: Float32Array.from([1, 2]) } };
    const layout = layoutOf(set);
    assert.deepEqual(layout.keys, ['a', 'b']);
    assert.deepEqual([...flatten(set, layout)], [1, 2, 3, 4]);
    assert.deepEqual([...unflatten(Float32Array.from([1, 2, 3, 4]), layout).b.data], [3, 4]);
    assert.throws(() => flatten({ a: set.a, b: { shape: [3], data: new Float32Array(3) } }, layout), (e: FederationError) => e.code === 'TANDEM_FED_UPDATE_SHAPE' && e.field === 'b');
  });
});

describe('LoRA-aware aggregation', () => {
  const A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
  const B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
  const product = (b: Float32Array, a: Float32Array, out: number, r: number, inn: number): Float64Array => {
    const m = new Float64Array(out * inn);
    for (let i = 0; i < out; i++) for (let p = 0; p < r; p++) for (let j = 0; j < inn; j++) m[i * inn + j] += b[i * r + p] * a[p * inn + j];
    return m;
  };

  it('refactors a rank-r average exactly and reports how far naive averaging is', () => {
    const [out, inn, r] = [6, 5, 2];
    // Owners share A (as FFA-LoRA keeps it): the mean of B·A has rank r and refactors exactly.
    const a = randomVector(r * inn, 7);
    const owners = [1, 2, 3].map((s) => ({ tensors: { [A]: { shape: [r, inn], data: a }, [B]: { shape: [out, r], data: randomVector(out * r, s) } }, weight: s }));
    const exact = exactLoraAggregate(owners);
    assert.ok(exact.refactorError[A] < 1e-5, `refactor error ${exact.refactorError[A]}`);
    assert.ok(exact.naiveError[A] < 1e-6, 'with A shared, mean(B)·A is the mean of B·A');
    const want = new Float64Array(out * inn);
    owners.forEach((o) => product(o.tensors[B].data, a, out, r, inn).forEach((v, i) => (want[i] += (v * o.weight) / 6)));
    const got = product(exact.tensors[B].data, exact.tensors[A].data, out, r, inn);
    got.forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-4, `ΔW[${i}] ${v} vs ${want[i]}`));
    // Different A per owner: naive averaging of A and B is off; the rank-r refactoring is the best rank-r ΔW.
    const diverse = [1, 2, 3].map((s) => ({ tensors: { [A]: { shape: [r, inn], data: randomVector(r * inn, 10 + s) }, [B]: { shape: [out, r], data: randomVector(out * r, s) } }, weight: 1 }));
    const d = exactLoraAggregate(diverse);
    assert.ok(d.naiveError[A] > d.refactorError[A], `naive ${d.naiveError[A]} vs refactor ${d.refactorError[A]}`);
  });
});

function secaggRound(updates: Map<string, Float32Array>, threshold: number, drop: (string | undefined)[] = []): { sum: Float32Array; masked: Map<string, Uint32Array> } {
  const owners = [...updates.keys()];
  const params: SecAggParams = { round: 'fed-1|3', length: updates.get(owners[0])!.length, threshold, owners: owners.length };
  const clients = new Map(owners.map((o) => [o, new SecAggOwner(o, params)]));
  const advertised = [...clients.values()].map((c) => c.advertise());
  const boxes: EncryptedShare[] = [...clients.values()].flatMap((c) => c.shareKeys(advertised));
  const masked = new Map<string, Uint32Array>();
  for (const [o, c] of clients) {
    if (drop.includes(o)) continue; // dropped after sharing its seeds, before sending its input
    masked.set(o, c.maskInput(updates.get(o)!, boxes.filter((b) => b.to === o)));
  }
  const survivors = [...masked.keys()];
  const revealed = survivors.map((o) => clients.get(o)!.reveal(survivors));
  return { sum: unmaskSum(params, advertised, masked, revealed), masked };
}

describe('secure aggregation', () => {
  const n = 400;
  const updates = new Map(['alice', 'bob', 'carol', 'dave'].map((o, i) => [o, randomVector(n, 100 + i, 0.2)]));

  it('the unmasked sum equals the plain sum within the fixed-point step', () => {
    const { sum } = secaggRound(updates, 3);
    const step = 2 ** -16;
    for (let i = 0; i < n; i++) {
      const plain = [...updates.values()].reduce((s, u) => s + u[i], 0);
      assert.ok(Math.abs(sum[i] - plain) <= 4 * (step / 2) + 1e-7, `coordinate ${i}: ${sum[i]} vs ${plain}`);
    }
  });

  it('a single masked update is uniform in the ring and decodes to noise', () => {
    const { masked } = secaggRound(updates, 3);
    const y = masked.get('alice')!;
    const plain = quantize(updates.get('alice')!, 4);
    assert.notDeepEqual([...y], [...plain]);
    // Uniform in Z_2^32: top byte spread over 16 buckets, chi-square well under the 0.1% critical value (37.7, 15 dof).
    const buckets = new Array(16).fill(0);
    for (const v of y) buckets[v >>> 28]++;
    const chi = buckets.reduce((s, c) => s + (c - n / 16) ** 2 / (n / 16), 0);
    assert.ok(chi < 37.7, `chi-square ${chi}`);
    // Decoded, it is noise of the ring's scale, uncorrelated with the update (|values| ≤ 0.1 here).
    const decoded = dequantize(y);
    const meanAbs = decoded.reduce((s, v) => s + Math.abs(v), 0) / n;
    assert.ok(meanAbs > 1000, `decoded mean |x| ${meanAbs}`);
    const u = updates.get('alice')!;
    let dot = 0;
    let nu = 0;
    let nd = 0;
    for (let i = 0; i < n; i++) {
      dot += u[i] * decoded[i];
      nu += u[i] ** 2;
      nd += decoded[i] ** 2;
    }
    assert.ok(Math.abs(dot / Math.sqrt(nu * nd)) < 0.25, 'masked update uncorrelated with the plain one');
  });

  it('an owner that drops out after sharing is recovered through Shamir shares of its mask key', () => {
    const { sum } = secaggRound(updates, 3, ['carol']);
    for (let i = 0; i < n; i++) {
      const plain = ['alice', 'bob', 'dave'].reduce((s, o) => s + updates.get(o)![i], 0);
      assert.ok(Math.abs(sum[i] - plain) <= 3 * 2 ** -17 + 1e-7, `coordinate ${i}`);
    }
  });

  it('below the threshold the round cannot be unmasked', () => {
    assert.throws(() => secaggRound(updates, 3, ['carol', 'dave']), (e: FederationError) => e.code === 'TANDEM_FED_SECAGG_BELOW_THRESHOLD');
  });

  it('Shamir: any t shares recover the seed, t−1 do not', () => {
    const secret = Uint8Array.from({ length: 32 }, (_, i) => (i * 37) & 255);
    const shares = splitSecret(secret, 5, 3);
    assert.deepEqual(combineShares([shares[4], shares[0], shares[2]], 3), secret);
    assert.deepEqual(combineShares(shares.slice(1, 4), 3), secret);
    assert.throws(() => combineShares(shares.slice(0, 2), 3), (e: FederationError) => e.code === 'TANDEM_FED_SHAMIR_INVALID');
    assert.throws(() => combineShares([{ x: 1, y: 'zz' }, shares[1], shares[2]], 3), (e: FederationError) => e.code === 'TANDEM_FED_SHAMIR_INVALID' && e.field === 'share');
  });

  it('refuses a value outside the fixed-point range', () => {
    assert.throws(() => quantize(Float32Array.from([1e5]), 4), (e: FederationError) => e.code === 'TANDEM_FED_SECAGG_INVALID');
  });
});

describe('client-level DP', () => {
  it('clips an update to norm C and leaves a small one alone', () => {
    const u = Float32Array.from([3, 4]);
    assert.equal(clipUpdate(u, 1), 5);
    assert.ok(Math.abs(Math.hypot(u[0], u[1]) - 1) < 1e-6);
    const small = Float32Array.from([0.3, 0.4]);
    clipUpdate(small, 1);
    assert.deepEqual([...small], [Math.fround(0.3), Math.fround(0.4)]);
  });

  it('ε matches Opacus for σ = 1.5, q = 0.04, 90 epochs, δ = 1e-5', () => {
    // Published value: pytorch/opacus, opacus/tests/accountants_test.py, test_rdp_accountant:
    //   noise_multiplier = 1.5, sample_rate = 0.04, steps = int(90 / 0.04), delta = 1e-5
    //   assertAlmostEqual(epsilon, 7.32911117143)   (7 decimal places)
    // with Opacus' default orders and the Balle et al. 2020 conversion, as here.
    const a = new RdpAccountant();
    a.compose(1.5, 0.04, Math.trunc(90 / 0.04));
    const { epsilon } = a.spent(1e-5);
    assert.ok(Math.abs(epsilon - 7.32911117143) < 5e-7, `ε = ${epsilon}`);
  });

  it('refuses a round that would exceed the budget and spends nothing', () => {
    const a = new RdpAccountant();
    const first = a.spendRound(1.0, 1, 1e-5, 8);
    assert.ok(first.epsilon > 0 && first.epsilon < 8);
    let rounds = 1;
    let refused: unknown;
    try {
      for (; rounds < 1000; rounds++) a.spendRound(1.0, 1, 1e-5, 8);
    } catch (e) {
      refused = e;
    }
    assert.ok(refused instanceof FederationError && refused.code === 'TANDEM_FED_DP_BUDGET_EXCEEDED');
    const spent = a.spent(1e-5).epsilon;
    assert.ok(spent <= 8, `spent ${spent}`);
    assert.equal(a.steps[0][2], rounds);
    assert.deepEqual(new RdpAccountant(a.state()).spent(1e-5), a.spent(1e-5));
  });
});
