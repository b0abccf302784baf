// Session records in JetStream under concurrent updates: each update sees the one before it,
// so a step finishing while the session closes does not write it back as open, and a lower
// step does not overwrite a higher one (the file store applies changes in place; this must
// behave the same).
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { JetStreamSessionStore } from '../../cloud-node/state/jetstream-session-store.ts';
import type { SessionRecord } from '../../cloud-node/state/session-store.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { openSessionRecord } from './helpers.ts';


describe('JetStream session records under concurrent updates', () => {
  let nats: TestNatsServer;
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    await nats?.close();
  });

  it('a close and two steps at once: closed, the highest step, not counted open, on this gateway and another', async () => {
    const [a, b] = [await connectNats(nats.url, 'test-a', 'gateway'), await connectNats(nats.url, 'test-b', 'gateway')];
    try {
      const store = await JetStreamSessionStore.open(a);
      const id = '0f6c2a4e-1b7d-4c1e-9a53-2d8e6f0b7c11';
      await store.add(openSessionRecord('alice', id));
      assert.equal(store.openCountOf('alice'), 1);
      await Promise.all([
        store.update(id, (s) => { s.lastStep = Math.max(s.lastStep, 5); }),
        store.update(id, (s) => { s.state = 'closed'; s.closeReason = 'closed-by-edge' as SessionRecord['closeReason']; }),
        store.update(id, (s) => { s.lastStep = Math.max(s.lastStep, 3); }),
      ]);
      const caller = { tenant: 'alice', admin: false } as Parameters<JetStreamSessionStore['get']>[0];
      assert.deepEqual([store.get(caller, id).state, store.get(caller, id).lastStep], ['closed', 5]);
      assert.equal(store.openCountOf('alice'), 0);
      const other = await JetStreamSessionStore.open(b);
      assert.deepEqual([other.get(caller, id).state, other.get(caller, id).lastStep], ['closed', 5]);
      await assert.rejects(store.update('0f6c2a4e-1b7d-4c1e-9a53-000000000000', () => undefined), { code: 'TANDEM_SESSION_UNKNOWN' });
      store.close();
      other.close();
    } finally {
      await a.drain();
      await b.drain();
    }
  });
});
