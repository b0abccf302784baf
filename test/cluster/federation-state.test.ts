// Federations and rounds in JetStream (bucket tandem-federations) against a real nats-server:
// the open round with its acknowledged updates and the finished rounds survive a nats-server
// restart; two coordinators (two gateways) on one bucket see each other's rounds, and a save
// from a stale record is refused (TANDEM_FED_STATE_CONFLICT) instead of overwriting a round.
import assert from 'node:assert/strict';
import { connect } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { after, before, describe, it } from 'node:test';
import { Coordinator, JetStreamFederationStore } from '../../cloud-node/federation/index.ts';
import type { CoordinatorError } from '../../cloud-node/federation/index.ts';
import { encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate } from '../../protocol/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { until } from './helpers.ts';

function body(id: string): FederationCreate {
  return {
    id, model: 'm', mode: 'offsite', rounds: 3, owners: ['a', 'b', 'c'], sampleSize: 3, minOwners: 2, localSteps: 1, roundDeadlineSeconds: 10,
    aggregation: 'fedavg', secureAggregation: false,
    adapter: { config: '{"peft_type":"LORA"}', tensors: { 'x.lora_A.weight': { shape: [2], data: encodeFloat32(Float32Array.from([1, 2])) } } },
  };
}

const update = (attempt: number, v: number[], examples = 1) => ({ attempt, examples, loss: 1, values: encodeFloat32(Float32Array.from(v)) });

describe('federations and rounds in JetStream', () => {
  let nats: TestNatsServer;
  const connections: NatsConnection[] = [];
  const open = async (now: () => number): Promise<Coordinator> => {
    const nc = await connect({ servers: nats.url, maxReconnectAttempts: -1, reconnectTimeWait: 100 });
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
