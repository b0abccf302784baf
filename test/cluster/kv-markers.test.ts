// A deleted record leaves nothing behind in its JetStream stream: the delete marker is removed
// once the other gateways' watches have seen it, so the stream of `tandem-sessions` holds the
// live sessions only, however many a tenant ever opened and closed — and removing it makes no
// watch skip what it has not yet been sent.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { AckPolicy, jetstream, jetstreamManager } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { JetStreamBucket } from '../../cloud-node/state/jetstream-bucket.ts';
import { JetStreamSessionStore, SESSIONS_BUCKET } from '../../cloud-node/state/jetstream-session-store.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { openSessionRecord, until } from './helpers.ts';


async function messagesOf(nc: NatsConnection, bucket: string): Promise<number> {
  return (await (await jetstreamManager(nc)).streams.info(`KV_${bucket}`)).state.messages;
}

describe('delete markers in the JetStream buckets', () => {
  let nats: TestNatsServer;
  let nc: NatsConnection;
  before(async () => {
    nats = await startNatsServer();
    nc = await connectNats(nats.url, 'test-markers', 'gateway');
  });
  after(async () => {
    await nc?.drain();
    await nats?.close();
  });

  it('300 sessions opened, closed and removed: once the watches have seen the removals, the stream keeps the 2 still open', async () => {
    const store = await JetStreamSessionStore.open(nc, { markerGraceMs: 60_000 });
    const other = await JetStreamSessionStore.open(nc);
    try {
      const kept = [openSessionRecord('alice'), openSessionRecord('alice')];
      for (const r of kept) await store.add(r);
      for (let i = 0; i < 30; i++) {
        await Promise.all(Array.from({ length: 10 }, async () => {
          const r = openSessionRecord('mallory');
          await store.add(r);
          await store.update(r.id, (s) => { s.state = 'closed'; });
          await store.remove(r.id);
        }));
      }
      assert.equal(await store.removeMarkers(), 0, 'within the grace time the markers stay, for the watches');
      await until(() => store.size === 2 && other.size === 2, 20_000, 'both gateways to see the removals').catch((e) => { throw new Error(`${e.message}: ${store.size} ${other.size} ${[...store.all()].map((s) => s.state)}`); });
      assert.equal(await store.removeMarkers(Date.now() + 60_000), 300);
      assert.equal(await messagesOf(nc, SESSIONS_BUCKET), 2);
      assert.deepEqual([store.size, other.size, store.openCountOf('alice'), other.openCountOf('alice'), other.openCountOf('mallory')], [2, 2, 2, 2, 0]);
    } finally {
      store.close();
      other.close();
    }
  });

  it('a marker goes only after the grace time, a value put again is kept, and a marker left by a stopped gateway is found at open', async () => {
    const name = 'test-markers';
    const options = { parse: (v: unknown) => (typeof v === 'object' && v !== null ? v as { n: number } : undefined), markerGraceMs: 60_000 };
    const bucket = await JetStreamBucket.open(nc, name, options);
    try {
      await bucket.put('a', { n: 1 });
      await bucket.put('b', { n: 1 });
      await bucket.delete('a');
      await bucket.delete('b');
      assert.equal(await bucket.removeMarkers(), 0, 'within the grace time, the markers stay for the watches');
      // Another writer puts `b` again: its value stays.
      const raw = await new Kvm(nc).open(name);
      await raw.put('b', JSON.stringify({ n: 2 }));
      assert.equal(await bucket.removeMarkers(Date.now() + 60_000), 1);
      assert.equal(await messagesOf(nc, name), 1);
      assert.equal((await raw.get('b'))?.json<{ n: number }>().n, 2);
      // A marker written by a gateway that stopped before purging it.
      await raw.delete('b');
      assert.equal(await messagesOf(nc, name), 1);
    } finally {
      bucket.close();
    }
    const reopened = await JetStreamBucket.open(nc, name, options);
    try {
      assert.equal(await reopened.removeMarkers(Date.now() + 60_000), 1);
      assert.equal(await messagesOf(nc, name), 0);
    } finally {
      reopened.close();
    }
  });

  it('a consumer of the whole bucket that has not been sent the latest puts still gets every one after markers are removed', async () => {
    const name = 'test-lagging';
    const bucket = await JetStreamBucket.open(nc, name, { parse: (v: unknown) => v as { n: number }, markerGraceMs: 60_000 });
    try {
      await bucket.put('gone', { n: 0 });
      // A durable consumer that fetches nothing yet stands for a watch the server is behind on.
      await (await jetstreamManager(nc)).consumers.add(`KV_${name}`, { durable_name: 'behind', ack_policy: AckPolicy.None, filter_subject: `$KV.${name}.>` });
      for (let i = 0; i < 5; i++) await bucket.put(`kept${i}`, { n: i });
      await bucket.delete('gone');
      assert.equal(await bucket.removeMarkers(Date.now() + 60_000), 1);
      const behind = await jetstream(nc).consumers.get(`KV_${name}`, 'behind');
      const seen: string[] = [];
      for await (const m of await behind.fetch({ max_messages: 10, expires: 2000 })) {
        seen.push(m.subject.slice(`$KV.${name}.`.length));
        if (seen.length === 5) break;
      }
      assert.deepEqual(seen, ['kept0', 'kept1', 'kept2', 'kept3', 'kept4']);
    } finally {
      bucket.close();
    }
  });
});
