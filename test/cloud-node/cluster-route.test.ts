// GET /v1/cluster (admin only) and GET /v1/sessions/:id/losses on a real node: the worker and its
// range and load, sessions and trained tokens by tenant, federations and their rounds, the
// series from the node's counters, and each session's loss curve from the edge's reported loss.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { CloudError, LossPoint, SeriesPoint, WorkerStatus } from '../../cloud-node/index.ts';
import { HIDDEN, TestClient, api, createTenantKey, frameOf, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { federationWithOneRound } from './dashboard-fixtures.ts';

interface ClusterView {
  model: string | null;
  workers: WorkerStatus[];
  tenants: { tenant: string; sessions: number; open: number; closed: number; trainedTokens: number }[];
  sessions: { id: string; tenant: string; state: string; lastStep: number; trainedTokens: number; lossPoints: number }[];
  federations: { id: string; state: string; round: number; rounds: number; owners: number; history: { round: number; participants: number; loss: number | null }[] }[];
  totals: { trainedTokens: number; steps: { forward: number; backward: number }; frameBytes: Record<string, { in: number; out: number }> };
  series: { intervalMs: number; points: SeriesPoint[] };
}

/** One training step of two micro-batches [2, 8, hidden], each backward reporting its share of the loss. */
async function trainStep(client: TestClient, step: number, shares: [number, number]): Promise<void> {
  const shape: [number, number, number] = [2, 8, HIDDEN];
  for (const microbatch of [0, 1]) {
    const fwd = await client.request(client.forwardBody(step, microbatch, [frameOf(randomTensor(shape, step * 10 + microbatch), shape)]));
    assert.equal(fwd.body.case, 'forwardResult');
  }
  for (const microbatch of [0, 1]) {
    const g = frameOf(randomTensor(shape, 500 + step * 10 + microbatch), shape);
    const bwd = await client.request({ case: 'backward', value: { sessionId: client.sessionId, step, microbatch, frames: [g], loss: shares[microbatch] } });
    assert.equal(bwd.body.case, 'backwardResult');
  }
}

describe('GET /v1/cluster and loss curves', () => {
  let node: TestNode;
  let aliceKey: string;
  let bobKey: string;
  let alice: TestClient;
  const aliceShares: [number, number][] = [[2.5, 1.25], [2, 1], [1.5, 0.75]];

  before(async () => {
    node = await startTestNode({ series: { intervalMs: 100, points: 1000 } });
    aliceKey = await createTenantKey(node, 'alice');
    bobKey = await createTenantKey(node, 'bob');
    alice = await TestClient.connect(node, aliceKey);
    await alice.hello({ versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 2 } } });
    for (let step = 0; step < aliceShares.length; step++) await trainStep(alice, step, aliceShares[step]);
    // A retried backward (new request id, same key) is answered from the kept reply: counted once.
    const g = frameOf(randomTensor([2, 8, HIDDEN], 521), [2, 8, HIDDEN]);
    await alice.request({ case: 'backward', value: { sessionId: alice.sessionId, step: 2, microbatch: 1, frames: [g], loss: 99 } });
    const bob = await TestClient.connect(node, bobKey);
    await bob.hello();
    await bob.request({ case: 'sessionClose', value: { sessionId: bob.sessionId, reason: 'completed', message: '' } });
    bob.close();
    await federationWithOneRound(node, 'fed', 3, { alice: { key: aliceKey, loss: 3 }, bob: { key: bobKey, loss: 1 } });
  });
  after(() => alice.close());

  async function cluster(): Promise<ClusterView> {
    const { status, json } = await api(node, 'GET', '/v1/cluster', node.adminKey);
    assert.equal(status, 200, JSON.stringify(json));
    return json as unknown as ClusterView;
  }

  it('lists this process as one worker running every middle block, idle after the steps', async () => {
    const view = await cluster();
    assert.equal(view.model, 'stories260K');
    assert.equal(view.workers.length, 1);
    const [worker] = view.workers;
    assert.equal(worker.model, 'stories260K');
    assert.match(worker.id, /:\d+$/);
    // stories260K has 5 blocks; a cut keeps at least the top block on the edge.
    assert.deepEqual(worker.blocks, { start: 0, end: 4 });
    assert.deepEqual([worker.load.queued, worker.load.running], [0, 0]);
    assert.ok(Math.abs(worker.lastSeenMs - Date.now()) < 60_000);
  });

  it('counts sessions by tenant and the tokens they trained, and the steps and bytes by codec', async () => {
    const view = await cluster();
    const tokens = aliceShares.length * 2 * 2 * 8;
    assert.deepEqual(view.tenants, [
      { tenant: 'alice', sessions: 1, open: 1, closed: 0, trainedTokens: tokens },
      { tenant: 'bob', sessions: 1, open: 0, closed: 1, trainedTokens: 0 },
    ]);
    const mine = view.sessions.find((s) => s.tenant === 'alice');
    assert.deepEqual(mine && [mine.id, mine.state, mine.lastStep, mine.trainedTokens, mine.lossPoints], [alice.sessionId, 'open', 2, tokens, 3]);
    assert.equal(view.totals.trainedTokens, tokens);
    assert.deepEqual(view.totals.steps, { forward: 6, backward: 6 });
    const f32 = view.totals.frameBytes.f32;
    assert.ok(f32.in > 0 && f32.out > 0 && f32.in === f32.out, JSON.stringify(f32));
  });

  it('lists federations with their rounds', async () => {
    const view = await cluster();
    assert.equal(view.federations.length, 1);
    const [fed] = view.federations;
    assert.deepEqual([fed.id, fed.state, fed.round, fed.rounds, fed.owners], ['fed', 'open', 2, 3, 2]);
    assert.deepEqual(fed.history.map((h) => [h.round, h.participants, h.loss]), [[1, 2, 2]]);
  });

  it('keeps a series whose rates are the counters\' differences over each interval', async () => {
    await new Promise((resolve) => setTimeout(resolve, 400));
    const { series, totals } = await cluster();
    assert.equal(series.intervalMs, 100);
    assert.ok(series.points.length >= 3 && series.points.length <= 1000, `${series.points.length} points`);
    const times = series.points.map((p) => p.t);
    assert.deepEqual(times, [...times].sort((a, b) => a - b), 'oldest first');
    for (let i = 1; i < series.points.length; i++) {
      const [a, b] = [series.points[i - 1], series.points[i]];
      const counted = (b.trainedTokensPerSecond * (b.t - a.t)) / 1000;
      assert.ok(Math.abs(counted - (b.trainedTokens - a.trainedTokens)) < 1e-6, `point ${i}: ${counted} vs ${b.trainedTokens - a.trainedTokens}`);
    }
    assert.ok(series.points.some((p) => p.trainedTokensPerSecond > 0 && p.stepLatencyMs.forward !== null && (p.frameBytesPerSecond.f32 ?? 0) > 0), 'the training shows in some interval');
    const latest = series.points.at(-1) as SeriesPoint;
    assert.equal(latest.trainedTokens, totals.trainedTokens);
    assert.equal(latest.trainedTokensPerSecond, 0, 'no training in the last interval');
    assert.deepEqual(latest.stepLatencyMs, { forward: null, backward: null });
    assert.ok(latest.memory.rssBytes > 0 && latest.memory.heapUsedBytes > 0 && latest.memory.heapTotalBytes >= latest.memory.heapUsedBytes);
  });

  it('keeps at most the points it was given: a new one pushes the oldest out', async () => {
    const small = await startTestNode({ series: { intervalMs: 50, points: 4 } });
    const points = async (): Promise<SeriesPoint[]> => ((await api(small, 'GET', '/v1/cluster', small.adminKey)).json.series as { points: SeriesPoint[] }).points;
    let before = await points();
    while (before.length < 4) before = await points();
    let later = await points();
    while ((later.at(-1) as SeriesPoint).t === (before.at(-1) as SeriesPoint).t) later = await points();
    assert.equal(later.length, 4);
    assert.ok(later[0].t > before[0].t && later.slice(0, -1).every((p, i) => p.t < later[i + 1].t));
    await small.close();
  });

  it('refuses a series option out of range at start, naming it', async () => {
    await assert.rejects(startTestNode({ series: { intervalMs: 0 } }), (e: CloudError) => e.code === 'TANDEM_OPTION_INVALID' && /series\.intervalMs/.test(e.message));
    await assert.rejects(startTestNode({ series: { points: 1.5 } }), (e: CloudError) => e.code === 'TANDEM_OPTION_INVALID' && /series\.points/.test(e.message));
  });

  it("gives a tenant its own session's loss curve, one point per step adding up the micro-batches' shares", async () => {
    const { status, json } = await api(node, 'GET', `/v1/sessions/${alice.sessionId}/losses`, aliceKey);
    assert.equal(status, 200, JSON.stringify(json));
    assert.equal(json.tenant, 'alice');
    assert.equal(json.trainedTokens, aliceShares.length * 2 * 2 * 8);
    assert.deepEqual(json.points as LossPoint[], aliceShares.map(([a, b], step) => ({ step, loss: a + b, microbatches: 2 })));
    const admin = await api(node, 'GET', `/v1/sessions/${alice.sessionId}/losses`, node.adminKey);
    assert.deepEqual(admin.json.points, json.points);
  });

  it("answers another tenant's session as absent, /v1/cluster only to the admin, and nothing without a key", async () => {
    const other = await api(node, 'GET', `/v1/sessions/${alice.sessionId}/losses`, bobKey);
    const missing = await api(node, 'GET', '/v1/sessions/no-such-session/losses', bobKey);
    assert.deepEqual([other.status, other.json.code], [404, 'TANDEM_SESSION_UNKNOWN']);
    assert.deepEqual([missing.status, missing.json.code], [404, 'TANDEM_SESSION_UNKNOWN']);
    assert.equal(String(other.json.message).replace(alice.sessionId, 'ID'), String(missing.json.message).replace('no-such-session', 'ID'));
    const tenant = await api(node, 'GET', '/v1/cluster', aliceKey);
    assert.deepEqual([tenant.status, tenant.json.code], [403, 'TANDEM_AUTH_ADMIN_REQUIRED']);
    for (const path of ['/v1/cluster', `/v1/sessions/${alice.sessionId}/losses`]) {
      const none = await api(node, 'GET', path);
      assert.deepEqual([none.status, none.json.code], [401, 'TANDEM_AUTH_KEY_MISSING']);
    }
  });

  it('documents both routes in the OpenAPI document', async () => {
    const { json } = await api(node, 'GET', '/v1/openapi.json', node.adminKey);
    const paths = json.paths as Record<string, Record<string, { responses: Record<string, unknown> }>>;
    assert.ok(paths['/v1/cluster']?.get.responses['200']);
    assert.ok(paths['/v1/sessions/{id}/losses']?.get.responses['200']);
    assert.equal(Object.keys(paths).some((p) => p.startsWith('/dashboard')), false, 'the page is not an API route');
  });
});
