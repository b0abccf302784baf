// The openSessions quota on a cluster gateway, whose session records are in JetStream: a
// session counts as open from the moment it is added, not once JetStream has acknowledged
// it, so a tenant sending many Hellos at once gets exactly its quota, as on one process.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { QuotaLedger } from '../../cloud-node/quotas.ts';
import { JetStreamSessionStore } from '../../cloud-node/state/jetstream-session-store.ts';
import { TestClient, api, helloBody } from '../cloud-node/helpers.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { openSessionRecord, startGateway } from './helpers.ts';


describe('openSessions on the JetStream session store', () => {
  let nats: TestNatsServer;
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    await nats?.close();
  });

  it('40 adds at once, each checked as the Hello checks it: exactly the quota lands, another tenant is unaffected, a failed add gives its slot back', async () => {
    const nc = await connectNats(nats.url, 'test-quota', 'gateway');
    const store = await JetStreamSessionStore.open(nc);
    try {
      const quotas = new QuotaLedger({ openSessions: 5 });
      const hello = async (tenant: string): Promise<string> => {
        try {
          quotas.checkOpenSessions(tenant, store.openCountOf(tenant));
          await store.add(openSessionRecord(tenant));
          return 'welcome';
        } catch (error) {
          return (error as { code?: string }).code ?? String(error);
        }
      };
      const replies = await Promise.all([...Array.from({ length: 40 }, () => hello('mallory')), hello('alice')]);
      const alice = replies.pop();
      assert.deepEqual([replies.filter((r) => r === 'welcome').length, replies.filter((r) => r === 'TANDEM_QUOTA_EXCEEDED').length], [5, 35]);
      assert.equal(alice, 'welcome');
      assert.deepEqual([store.openCountOf('mallory'), store.openCountOf('alice'), store.openCount], [5, 1, 6]);
      const caller = { tenant: 'mallory', admin: false } as Parameters<JetStreamSessionStore['list']>[0];
      assert.equal(store.list(caller).length, 5);
      // A record the bucket refuses (an id that is no key) is not left counted.
      await assert.rejects(store.add({ ...openSessionRecord('bob'), id: 'not a key' }));
      assert.equal(store.openCountOf('bob'), 0);
    } finally {
      store.close();
      await nc.drain();
    }
  });

  it('a gateway: 24 Hellos at once from one tenant get 4 welcomes and 20 TANDEM_QUOTA_EXCEEDED naming openSessions', async () => {
    const gateway = await startGateway(nats.url, { quotas: { openSessions: 4 } });
    try {
      const node = { ...gateway, adminKey: gateway.adminKey as string };
      const keyOf = async (tenant: string): Promise<string> => (await api(node, 'POST', '/v1/keys', node.adminKey, { tenant })).json.key as string;
      const eveKey = await keyOf('eve');
      const eve = await TestClient.connect(node, eveKey);
      const hello = helloBody({ cut: { bottom: 1, top: 1 } });
      const replies = await Promise.all(Array.from({ length: 24 }, () => eve.request(hello)));
      const welcomes = replies.filter((r) => r.body.case === 'welcome').length;
      const refused = replies.filter((r) => r.body.case === 'error' && r.body.value.code === 'TANDEM_QUOTA_EXCEEDED' && r.body.value.details.quota === 'openSessions');
      assert.deepEqual([welcomes, refused.length], [4, 20], JSON.stringify(replies.map((r) => r.body.case)));
      const listed = (await api(node, 'GET', '/v1/sessions', eveKey)).json.sessions as { state: string }[];
      assert.equal(listed.filter((s) => s.state === 'open').length, 4);
      const carol = await TestClient.connect(node, await keyOf('carol'));
      assert.equal((await carol.request(hello)).body.case, 'welcome', 'another tenant still opens a session');
      eve.close();
      carol.close();
    } finally {
      await gateway.remove();
    }
  });
});
