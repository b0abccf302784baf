// NATS as deployed (infra/nats/auth.conf): no one connects without a role's password, and a
// worker cannot touch the state — it cannot write itself an admin key into the key bucket,
// read the sessions, or listen to the edges' state traffic — while it still serves the middle.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { Kvm } from '@nats-io/kv';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import type { ClusterError } from '../../cloud-node/cluster/errors.ts';
import { JetStreamKeyStore } from '../../cloud-node/state/jetstream-key-store.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';

describe('NATS users and permissions', () => {
  let nats: TestNatsServer;
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    await nats?.close();
  });

  it('refuses a connection without a password, or with the wrong one', async () => {
    await assert.rejects(connect({ servers: nats.url, maxReconnectAttempts: 0 }), /Authorization|AUTHORIZATION/i);
    await assert.rejects(connect({ servers: nats.url, user: 'tandem-gateway', pass: 'not-it', maxReconnectAttempts: 0 }), /Authorization|AUTHORIZATION/i);
    const saved = process.env.TANDEM_NATS_WORKER_PASSWORD;
    process.env.TANDEM_NATS_WORKER_PASSWORD = 'not-it';
    try {
      await assert.rejects(connectNats(nats.url, 'test', 'worker'), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_NATS_UNREACHABLE' && /authorization/i.test(e.message));
    } finally {
      process.env.TANDEM_NATS_WORKER_PASSWORD = saved;
    }
  });

  it('a gateway holds the state; a worker cannot write a key record, read the buckets or watch them', async () => {
    const gateway = await connectNats(nats.url, 'test-gateway', 'gateway');
    const worker = await connectNats(nats.url, 'test-worker', 'worker');
    try {
      const keys = await JetStreamKeyStore.open(gateway);
      await keys.create('alice');
      keys.close();
      // The worker's attempts: a forged admin record, a read, a watch of the key bucket.
      const errors: string[] = [];
      worker.closed().catch(() => undefined);
      // The server's permission violations arrive as status events.
      void (async () => {
        for await (const s of worker.status()) if (s.type === 'error') errors.push(String((s as { error?: unknown }).error ?? s.type));
      })();
      await assert.rejects((async () => {
        const kv = await new Kvm(worker).open('tandem-keys');
        await kv.put('forged', JSON.stringify({ tenant: 'mallory', admin: true }));
      })(), /permission|timeout|503|no responders/i);
      const sub = worker.subscribe('$KV.tandem-keys.>');
      await worker.flush().catch(() => undefined);
      await new Promise((r) => setTimeout(r, 200));
      sub.unsubscribe();
      assert.ok(errors.some((e) => /permission/i.test(e)), `the server reported a permissions violation: ${errors.join('; ')}`);
      // Nothing forged reached the bucket.
      const check = await new Kvm(gateway).open('tandem-keys');
      assert.equal(await check.get('forged'), null);
    } finally {
      await worker.close();
      await gateway.drain();
    }
  });

  it('a worker may take the middle\'s requests, answer them and announce itself', async () => {
    const gateway = await connectNats(nats.url, 'test-gateway', 'gateway');
    const worker = await connectNats(nats.url, 'test-worker', 'worker');
    try {
      const announced = new Promise<string>((resolve) => gateway.subscribe('tandem.cluster.workers', { max: 1, callback: (_e, m) => resolve(m.string()) }));
      worker.subscribe('tandem.middle.m.0-2', { queue: 'tandem-middle-0-2', callback: (_e, m) => { m.respond(`echo ${m.string()}`); } });
      await worker.flush();
      await gateway.flush();
      worker.publish('tandem.cluster.workers', 'w1');
      assert.equal(await announced, 'w1');
      const reply = await gateway.request('tandem.middle.m.0-2', 'h', { timeout: 5_000 });
      assert.equal(reply.string(), 'echo h');
    } finally {
      await worker.drain();
      await gateway.drain();
    }
  });
});
