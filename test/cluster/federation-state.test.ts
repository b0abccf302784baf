// Federations and rounds in JetStream (bucket tandem-federations) against a real nats-server:
// the open round with its acknowledged updates and the finished rounds survive a nats-server
// restart; two coordinators (two gateways) on one bucket see each other's rounds, and a save
// from a stale record is refused (TANDEM_FED_STATE_CONFLICT) instead of overwriting a round. A
// record over max_payload goes through the object store, and only its latest copy is kept.
import assert from 'node:assert/strict';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import type { NatsConnection } from '@nats-io/transport-node';
import { after, before, describe, it } from 'node:test';
import { Objm } from '@nats-io/obj';
import { Coordinator, JetStreamFederationStore, LARGE_FEDERATIONS_BUCKET } from '../../cloud-node/federation/index.ts';
import type { CoordinatorError } from '../../cloud-node/federation/index.ts';
import { encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate } from '../../protocol/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { until } from './helpers.ts';

function body(id: string, values = [1, 2]): FederationCreate {
  return {
    id, model: 'm', mode: 'offsite', rounds: 3, owners: ['a', 'b', 'c'], sampleSize: 3, minOwners: 2, localSteps: 1, roundDeadlineSeconds: 10,
    aggregation: 'fedavg', secureAggregation: false,
    adapter: { config: '{"peft_type":"LORA"}', tensors: { 'x.lora_A.weight': { shape: [values.length], data: encodeFloat32(Float32Array.from(values)) } } },
  };
}

const update = (attempt: number, v: number[], examples = 1) => ({ attempt, examples, loss: 1, values: encodeFloat32(Float32Array.from(v)) });

describe('federations and rounds in JetStream', () => {
  let nats: TestNatsServer;
  const connections: NatsConnection[] = [];
  const open = async (now: () => number): Promise<Coordinator> => {
    const nc = await connectNats(nats.url, 'test-federations', 'gateway');
    connections.push(nc);
    return Coordinator.open({ store: await JetStreamFederationStore.open(nc), now, tickMs: 1e9 });
  };
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    for (const nc of connections) await nc.close().catch(() => undefined);
    await nats.close();
  });

  it('a finished round and the open round with its acknowledged update survive a nats-server restart', async () => {
    let now = 1_000_000;
    const c = await open(() => now);
    await c.create(body('restart'));
    await c.submit('restart', 'a', 1, update(0, [1, 1], 3));
    await c.submit('restart', 'b', 1, update(0, [-1, 3], 1));
    now += 11_000;
    await c.tick();
    await c.submit('restart', 'c', 2, update(0, [2, 2], 2));
    const before = c.status('restart');
    assert.equal(before.round, 2);
    assert.deepEqual(before.current.received, ['c']);
    const global = c.globalAdapter('restart');
    c.close();

    await nats.stop();
    await nats.start();

    const reopened = await open(() => now);
    try {
      assert.deepEqual(reopened.status('restart'), before, 'the federation, its history and the open round as they were');
      assert.deepEqual(reopened.globalAdapter('restart'), global);
      await assert.rejects(reopened.submit('restart', 'c', 2, update(0, [2, 2], 2)), (e: CoordinatorError) => e.code === 'TANDEM_FED_UPDATE_REPLAY', 'the acknowledged update is still in');
      await reopened.submit('restart', 'a', 2, update(0, [0, 0], 1));
      assert.deepEqual(reopened.status('restart').current.received, ['a', 'c']);
    } finally {
      reopened.close();
    }
  });

  it('two gateways share a federation: each sees the other\'s updates, and a stale save is refused, not applied over a round', async () => {
    const now = (): number => 5_000_000;
    const first = await open(now);
    const second = await open(now);
    try {
      await first.create(body('shared'));
      await until(() => second.ids().includes('shared'), 10_000, 'the second gateway saw the federation');
      await first.submit('shared', 'a', 1, update(0, [1, 1]));
      await until(() => second.status('shared').current.received.length === 1, 10_000, 'the second gateway saw the update');
      await second.submit('shared', 'b', 1, update(0, [3, 3]));
      await until(() => first.status('shared').current.received.length === 2, 10_000, 'the first gateway saw the second update');
      assert.deepEqual(first.status('shared').current.received, ['a', 'b']);

      // Both take c's update at once: one save wins, the other is refused and not acknowledged.
      const results = await Promise.allSettled([first.submit('shared', 'c', 1, update(0, [5, 5])), second.submit('shared', 'c', 1, update(0, [7, 7]))]);
      const won = results.filter((r) => r.status === 'fulfilled');
      const refused = results.filter((r) => r.status === 'rejected').map((r) => (r.reason as CoordinatorError).code);
      assert.equal(won.length, 1, 'exactly one save of c\'s update is acknowledged');
      assert.deepEqual(refused, ['TANDEM_FED_STATE_CONFLICT']);
      const winner = results[0].status === 'fulfilled' ? first : second;
      const loser = winner === first ? second : first;
      const finished = winner.status('shared');
      assert.equal(finished.round, 2, 'three updates of three: round 1 closed');
      await until(() => loser.status('shared').round === 2, 10_000, 'the other gateway got the winner\'s round');
      assert.deepEqual(loser.status('shared'), finished);
      assert.deepEqual(loser.globalAdapter('shared'), winner.globalAdapter('shared'));
    } finally {
      first.close();
      second.close();
    }
  });
});

describe('federations larger than max_payload (nats-server with max_payload 16 KiB)', () => {
  let nats: TestNatsServer;
  const connections: NatsConnection[] = [];
  before(async () => {
    nats = await startNatsServer({ maxPayload: 16 * 1024 });
  });
  after(async () => {
    for (const nc of connections) await nc.close().catch(() => undefined);
    await nats.close();
  });

  it('a federation whose adapter alone is over max_payload is stored, seen by another gateway, and survives a restart', async () => {
    const now = (): number => 9_000_000;
    const open = async (): Promise<{ nc: NatsConnection; c: Coordinator }> => {
      const nc = await connectNats(nats.url, 'test-federations', 'gateway');
      connections.push(nc);
      return { nc, c: await Coordinator.open({ store: await JetStreamFederationStore.open(nc), now, tickMs: 1e9 }) };
    };
    const size = 8192; // 32 KiB of float32, about 44 KB of base64
    const first = await open();
    const second = await open();
    await first.c.create(body('big', Array.from({ length: size }, (_, i) => i / size)));
    await first.c.submit('big', 'a', 1, update(0, Array.from({ length: size }, () => 0.5)));
    await until(() => second.c.ids().includes('big') && second.c.status('big').current.received.length === 1, 10_000, 'the second gateway saw the large record');
    assert.deepEqual(second.c.globalAdapter('big'), first.c.globalAdapter('big'));
    const before = first.c.status('big');
    const objects = await new Objm(first.nc).open(LARGE_FEDERATIONS_BUCKET);
    assert.deepEqual((await objects.list()).filter((o) => !o.deleted).length, 1, 'two saves, one stored copy: the superseded one is deleted');
    first.c.close();
    second.c.close();

    await nats.stop();
    await nats.start();

    const reopened = await open();
    try {
      assert.deepEqual(reopened.c.status('big'), before);
      assert.equal(reopened.c.globalAdapter('big').tensors['x.lora_A.weight'].shape[0], size);
    } finally {
      reopened.c.close();
    }
  });
});
