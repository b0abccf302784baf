// The loss curves behind the tenant's dashboard: one point per step adding up its micro-batches'
// shares, each counted once; unreported and non-finite values ignored; bounded per session, in
// sessions and in micro-batches per step.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { LossHistory } from '../../cloud-node/loss-history.ts';

describe('LossHistory', () => {
  it('adds up a step\'s shares in micro-batch order, a repeated micro-batch replacing its share', () => {
    const h = new LossHistory();
    h.record('s', 1, 1, 0.25);
    h.record('s', 1, 0, 0.5);
    h.record('s', 0, 0, 3);
    h.record('s', 1, 1, 0.125);
    assert.deepEqual(h.points('s'), [{ step: 0, loss: 3, microbatches: 1 }, { step: 1, loss: 0.625, microbatches: 2 }]);
    assert.equal(h.count('s'), 2);
    assert.deepEqual(h.points('other'), []);
  });

  it('ignores a loss not reported (0 or absent) and NaN or an infinity', () => {
    const h = new LossHistory();
    for (const loss of [0, undefined, Number.NaN, Infinity, -Infinity]) assert.equal(h.record('s', 0, 0, loss), false);
    assert.equal(h.count('s'), 0);
    assert.equal(h.record('s', 0, 0, -0.5), true);
  });

  it('keeps the latest steps of a session, the latest sessions, and a bounded number of micro-batches per step', () => {
    const h = new LossHistory({ pointsPerSession: 3, sessions: 2, microbatchesPerStep: 2 });
    for (let step = 0; step < 5; step++) h.record('a', step, 0, 1);
    assert.deepEqual(h.points('a').map((p) => p.step), [2, 3, 4]);
    assert.equal(h.record('a', 4, 1, 1), true);
    assert.equal(h.record('a', 4, 2, 1), false, 'a third micro-batch is over the bound');
    assert.equal(h.record('a', 4, 1, 2), true, 'a known micro-batch may still be replaced');
    h.record('b', 0, 0, 1);
    h.record('a', 5, 0, 1); // a reported last: b is now the least recent
    h.record('c', 0, 0, 1);
    assert.deepEqual([h.count('a'), h.count('b'), h.count('c')], [3, 0, 1]);
    h.retain((id) => id !== 'a');
    assert.equal(h.count('a'), 0);
  });

  it("a tenant that churns sessions pushes out its own curves, never another tenant's", () => {
    const h = new LossHistory({ sessions: 8, sessionsPerTenant: 3 });
    for (let step = 0; step < 5; step++) h.record('victim', step, 0, 2 + step, 'alice');
    h.record('bob-1', 0, 0, 1, 'bob');
    for (let i = 0; i < 1030; i++) h.record(`m-${i}`, 0, 0, 1, 'mallory');
    assert.equal(h.count('victim'), 5, "alice's curve stays");
    assert.equal(h.count('bob-1'), 1);
    assert.deepEqual([h.count('m-1026'), h.count('m-1027'), h.count('m-1028'), h.count('m-1029')], [0, 1, 1, 1], "mallory keeps her latest three");
    // Full in all: the tenant holding the most gives way first.
    for (let i = 0; i < 3; i++) h.record(`c-${i}`, 0, 0, 1, 'carol');
    h.record('d-0', 0, 0, 1, 'dave');
    assert.equal(h.count('victim'), 5);
    assert.equal(h.count('m-1027'), 0, "the full history took mallory's oldest");
    h.retain((id) => !id.startsWith('m-'));
    for (let i = 0; i < 2; i++) h.record(`e-${i}`, 0, 0, 1, 'erin');
    assert.equal(h.count('victim'), 5, 'places freed by retain are used before anything is evicted');
  });

  it('bounds a session\'s shares over all its steps, the earliest steps leaving first', () => {
    const h = new LossHistory({ pointsPerSession: 100, microbatchesPerStep: 4, sharesPerSession: 6 });
    for (let step = 0; step < 3; step++) for (let m = 0; m < 3; m++) h.record('a', step, m, 1);
    // 9 shares over a bound of 6: step 0 went when step 2's first share came.
    assert.deepEqual(h.points('a').map((p) => [p.step, p.microbatches]), [[1, 3], [2, 3]]);
    assert.equal(h.record('a', 1, 0, 5), true, 'a known share is replaced without counting again');
    assert.deepEqual(h.points('a').map((p) => p.step), [1, 2]);
    const one = new LossHistory({ microbatchesPerStep: 8, sharesPerSession: 2 });
    assert.equal(one.record('b', 0, 0, 1), true);
    assert.equal(one.record('b', 0, 1, 1), true);
    assert.equal(one.record('b', 0, 2, 1), false, 'a lone step over the bound keeps what it has');
    assert.deepEqual(one.points('b'), [{ step: 0, loss: 2, microbatches: 2 }]);
  });
});
