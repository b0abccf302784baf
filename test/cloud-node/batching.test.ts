// The executor's scheduler (issue 13): concurrent requests of one kind are coalesced into one
// packed backbone call, and each request gets exactly what it gets alone (within 1e-5 in f32),
// for sequences of different lengths, batch sizes and cuts; forwards, backwards from a packed
// tape (also when only some members' backwards come) and backwards recomputing from h_B.
// Batches are filled by weighted rounds over tenants, a tenant's tokens in flight capped; a
// request whose sender stopped waiting before it left the queue is dropped unrun.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { CloudError } from '../../cloud-node/errors.ts';
import { MiddleExecutor, TapeLost } from '../../cloud-node/middle-executor.ts';
import type { BatchInfo, BlockRange, Shape3 } from '../../cloud-node/middle-executor.ts';
import { HIDDEN, STORIES_DIR, randomTensor } from './helpers.ts';

interface Case {
  tenant: string;
  range: BlockRange;
  shape: Shape3;
  h: Float32Array;
  g: Float32Array;
}

// Different cuts of the 5-block model, different lengths and batch sizes.
const CASES: Case[] = [
  { tenant: 'a', range: { start: 1, end: 4 }, shape: [1, 8, HIDDEN] },
  { tenant: 'b', range: { start: 2, end: 3 }, shape: [2, 13, HIDDEN] },
  { tenant: 'c', range: { start: 1, end: 4 }, shape: [1, 5, HIDDEN] },
  { tenant: 'a', range: { start: 0, end: 4 }, shape: [1, 8, HIDDEN] },
  { tenant: 'd', range: { start: 2, end: 4 }, shape: [3, 13, HIDDEN] },
].map((c, i) => ({ ...c, shape: c.shape as Shape3, h: randomTensor(c.shape, 100 + i), g: randomTensor(c.shape, 200 + i) }));

let batched: MiddleExecutor;
let alone: MiddleExecutor;
const batches: BatchInfo[] = [];

before(async () => {
  [batched, alone] = await Promise.all([
    MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 200, maxBatchTokens: 4096, onBatch: (b) => batches.push(b) }),
    MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 0 }),
  ]);
});
after(async () => {
  await Promise.all([batched?.close(), alone?.close()]);
});

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Each case computed alone, one after another. */
async function reference(op: (e: MiddleExecutor, c: Case) => Promise<Float32Array>): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (const c of CASES) out.push(await op(alone, c));
  return out;
}

function assertClose(got: Float32Array[], want: Float32Array[], what: string): void {
  got.forEach((g, i) => {
    const d = maxDiff(g, want[i]);
    assert.ok(d <= 1e-5, `${what} of request ${i} differs by ${d}`);
  });
}

describe('batched middle across sessions', () => {
  it('forwards of sessions with different lengths and cuts run as one batch, each getting its own rows', async () => {
    const want = await reference((e, c) => e.forward(c.range, c.h, c.shape, c.tenant));
    batches.length = 0;
    const got = await Promise.all(CASES.map((c) => batched.forward(c.range, c.h, c.shape, c.tenant)));
    assert.deepEqual(batches.map((b) => [b.kind, b.requests]), [['forward', CASES.length]]);
    assert.equal(batches[0].tokens, CASES.reduce((n, c) => n + c.shape[0] * c.shape[1], 0));
    assert.equal(batches[0].tenantTokens.get('a'), 16);
    assertClose(got, want, 'h_M');
    // A different input gives a different output: the comparison can fail.
    assert.ok(maxDiff(got[0], want[3]) > 1e-3);
  });

  it('backwards from one packed tape run as one batch and equal backwards computed alone', async () => {
    const want = await reference((e, c) => e.backward(c.range, c.h, c.g, c.shape, c.tenant));
    batches.length = 0;
    const taped = await Promise.all(CASES.map((c) => batched.forwardKeepingTape(c.range, c.h, c.shape, c.tenant)));
    assert.ok(taped.every((t) => t.tape.savedBytes > 0));
    const got = await Promise.all(CASES.map((c, i) => batched.backwardFromTape(taped[i].tape, c.g, c.shape, c.tenant)));
    assert.deepEqual(batches.map((b) => [b.kind, b.requests]), [['forward', CASES.length], ['backwardFromTape', CASES.length]]);
    assertClose(got, want, 'g_B');
  });

  it('when only some members of a packed tape ask, they get their g_B; a later member finds the tape gone and recomputes', async () => {
    const want = await reference((e, c) => e.backward(c.range, c.h, c.g, c.shape, c.tenant));
    const taped = await Promise.all(CASES.map((c) => batched.forwardKeepingTape(c.range, c.h, c.shape, c.tenant)));
    // Members 3 and 4 never ask (their activations were evicted): their parts are dropped.
    taped[3].tape.dispose();
    taped[4].tape.dispose();
    const early = await Promise.all([0, 1].map((i) => batched.backwardFromTape(taped[i].tape, CASES[i].g, CASES[i].shape, CASES[i].tenant)));
    assertClose(early, want.slice(0, 2), 'g_B');
    await assert.rejects(batched.backwardFromTape(taped[2].tape, CASES[2].g, CASES[2].shape, CASES[2].tenant), TapeLost);
    const late = await batched.backward(CASES[2].range, CASES[2].h, CASES[2].g, CASES[2].shape, CASES[2].tenant);
    assertClose([late], [want[2]], 'g_B');
  });

  it('backwards recomputing from h_B run as one batch and equal those computed alone', async () => {
    const want = await reference((e, c) => e.backward(c.range, c.h, c.g, c.shape, c.tenant));
    batches.length = 0;
    const got = await Promise.all(CASES.map((c) => batched.backward(c.range, c.h, c.g, c.shape, c.tenant)));
    assert.deepEqual(batches.map((b) => [b.kind, b.requests]), [['backward', CASES.length]]);
    assertClose(got, want, 'g_B');
  });

  it('one request that breaks the compute does not fail the others of its batch: they run again alone and answer exactly', async () => {
    const want = await reference((e, c) => e.forward(c.range, c.h, c.shape, c.tenant));
    batches.length = 0;
    // A hidden size the model does not have: the compute throws, and its worker ends.
    const poison = batched.forward({ start: 1, end: 4 }, new Float32Array(8 * 7), [1, 8, 7], 'mallory');
    const got = Promise.all(CASES.map((c) => batched.forward(c.range, c.h, c.shape, c.tenant)));
    await assert.rejects(poison, { code: 'TANDEM_COMPUTE_FAILED' });
    assertClose(await got, want, 'h_M');
    assert.equal(batches[0].requests, CASES.length + 1, 'the poison was batched with the others');
    assert.ok(batches.slice(1).every((b) => b.requests === 1), `then each ran alone: ${batches.map((b) => b.requests).join(', ')}`);
  });
});

describe('filling a batch: tenant weights and tokens in flight', () => {
  const shape: Shape3 = [1, 8, HIDDEN];
  const h = randomTensor(shape, 7);
  const big: Shape3 = [1, 128, HIDDEN];
  const hBig = randomTensor(big, 8);
  const range = { start: 1, end: 4 };

  /** Keeps the worker busy with a large forward, queues the requests behind it, and returns the batches that followed. */
  async function behindBusy(options: { tenantWeights?: Record<string, number>; tenantTokensInFlight?: number }, tenants: string[]): Promise<BatchInfo[]> {
    const seen: BatchInfo[] = [];
    const executor = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 0, maxBatchTokens: 32, onBatch: (b) => seen.push(b), ...options });
    try {
      const busy = executor.forward(range, hBig, big, 'busy');
      const rest = tenants.map((t) => executor.forward(range, h, shape, t));
      await Promise.all([busy, ...rest]);
    } finally {
      await executor.close();
    }
    return seen.slice(1);
  }

  it('a tenant of weight 3 takes three requests per round, one of weight 1 one; a tenant never has more tokens computing than its cap', async () => {
    const tenants = ['b', 'b', 'b', 'b', 'a', 'a', 'a', 'a'];
    const [even, weighted, capped] = await Promise.all([
      behindBusy({}, tenants),
      behindBusy({ tenantWeights: { a: 3 } }, tenants),
      behindBusy({ tenantTokensInFlight: 16 }, ['a', 'a', 'a', 'a']),
    ]);
    assert.deepEqual([...even[0].tenantTokens], [['b', 16], ['a', 16]]);
    assert.deepEqual([...weighted[0].tenantTokens], [['b', 8], ['a', 24]]);
    assert.deepEqual(capped.map((b) => b.tokens), [16, 16]);
  });

  it('a request still queued when its sender has stopped waiting is dropped unrun; the others behind the busy worker run', async () => {
    const seen: BatchInfo[] = [];
    const executor = await MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: 0, maxBatchTokens: 32, onBatch: (b) => seen.push(b) });
    try {
      const busy = executor.forward(range, hBig, big, 'busy');
      // Behind the busy forward: one whose sender waits 1 ms (a gateway that gave up), one with no wait stated.
      const abandoned = executor.forward(range, h, shape, 'mallory', undefined, 1);
      const live = executor.forward(range, h, shape, 'bob');
      await assert.rejects(abandoned, (e: CloudError) => e.code === 'TANDEM_COMPUTE_FAILED' && /not computed/.test(e.message));
      await Promise.all([busy, live]);
      assert.deepEqual(seen.map((b) => [...b.tenantTokens.keys()]), [['busy'], ['bob']], 'mallory\'s forward was never computed');
    } finally {
      await executor.close();
    }
  });

  it('bad options are refused at start', async () => {
    await assert.rejects(MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', maxBatchTokens: 0 }), { code: 'TANDEM_OPTION_INVALID' });
    await assert.rejects(MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', tenantWeights: { a: 0.5 } }), { code: 'TANDEM_OPTION_INVALID' });
    await assert.rejects(MiddleExecutor.start({ modelDir: STORIES_DIR, backend: 'wasm', batchWindowMs: Number.NaN }), { code: 'TANDEM_OPTION_INVALID' });
  });
});

describe('batched middle on ONNX Runtime (--engine ort-cpu)', () => {
  // One range and one length stack along the batch axis into one ORT run; others run one by one.
  const uniform: Case[] = [1, 2, 1].map((b, i) => {
    const shape: Shape3 = [b, 8, HIDDEN];
    return { tenant: `u${i}`, range: { start: 1, end: 4 }, shape, h: randomTensor(shape, 300 + i), g: randomTensor(shape, 400 + i) };
  });

  it('stacked forwards and backwards from the stacked tape equal those computed alone; mixed lengths and cuts still answer each exactly', async () => {
    const seen: BatchInfo[] = [];
    const [ort, ortAlone] = await Promise.all([
      MiddleExecutor.start({ modelDir: STORIES_DIR, engine: 'ort-cpu', threads: 1, batchWindowMs: 200, maxBatchTokens: 4096, onBatch: (b) => seen.push(b) }),
      MiddleExecutor.start({ modelDir: STORIES_DIR, engine: 'ort-cpu', threads: 1, batchWindowMs: 0 }),
    ]);
    try {
      for (const cases of [uniform, CASES]) {
        const wantOut: Float32Array[] = [];
        const wantGrad: Float32Array[] = [];
        for (const c of cases) {
          wantOut.push(await ortAlone.forward(c.range, c.h, c.shape, c.tenant));
          wantGrad.push(await ortAlone.backward(c.range, c.h, c.g, c.shape, c.tenant));
        }
        seen.length = 0;
        const taped = await Promise.all(cases.map((c) => ort.forwardKeepingTape(c.range, c.h, c.shape, c.tenant)));
        const grads = await Promise.all(cases.map((c, i) => ort.backwardFromTape(taped[i].tape, c.g, c.shape, c.tenant)));
        assert.deepEqual(seen.map((b) => b.requests), [cases.length, cases.length]);
        assertClose(taped.map((t) => t.output), wantOut, 'h_M');
        assertClose(grads, wantGrad, 'g_B');
        const recomputed = await Promise.all(cases.map((c) => ort.backward(c.range, c.h, c.g, c.shape, c.tenant)));
        assertClose(recomputed, wantGrad, 'recomputed g_B');
      }
    } finally {
      await Promise.all([ort.close(), ortAlone.close()]);
    }
  });
});
