// Quotas across the gateways of a cluster: each gateway reports what a tenant spends through it
// (JetStream bucket tandem-quota-usage) and counts the others' reports, so that two gateways do
// not give a tenant twice its tokensInFlight or bytesPerMinute. A gateway closed takes its
// reports with it; one gone without closing stops counting once its report is stale.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createHash } from 'node:crypto';
import { Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { CloudError } from '../../cloud-node/errors.ts';
import { QuotaLedger } from '../../cloud-node/quotas.ts';
import { JetStreamQuotaUsage, QUOTA_USAGE_BUCKET, STALE_MS } from '../../cloud-node/state/jetstream-quota-usage.ts';
import { HIDDEN, TestClient, createTenantKey, frameOf, randomTensor } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';
import { startGateway } from './helpers.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';

const refused = (quota: string) => (e: unknown): boolean => e instanceof CloudError && e.code === 'TANDEM_QUOTA_EXCEEDED' && e.details.quota === quota && /through other gateways/.test(e.message);

/** Waits until `seen()` holds (the other gateway's report arrived through the watch). */
async function until(seen: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !seen(); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(seen(), what);
}

describe('quotas shared by the gateways of a cluster', () => {
  let nats: TestNatsServer;
  const connections: NatsConnection[] = [];
  const gateway = async (name: string): Promise<{ ledger: QuotaLedger; usage: JetStreamQuotaUsage }> => {
    const nc = await connectNats(nats.url, `test-quota-${name}`, 'gateway');
    connections.push(nc);
    const ledger = new QuotaLedger({ tokensInFlight: 1000, bytesPerMinute: 10_000 });
    return { ledger, usage: await JetStreamQuotaUsage.open(nc, ledger, { reportMs: 50 }) };
  };
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    for (const nc of connections) await nc.close();
    await nats?.close();
  });

  it('tokens in flight and bytes per minute spent through one gateway count on the other; another tenant is unaffected; a close takes the reports away', async () => {
    const a = await gateway('a');
    const b = await gateway('b');
    const release = a.ledger.reserveTokens('mallory', 600);
    a.ledger.chargeBytes('mallory', 7_000);
    await until(() => b.usage.usage('mallory').tokens === 600 && b.usage.usage('mallory').windowBytes === 7_000, 'b sees what mallory spends through a');
    assert.throws(() => b.ledger.reserveTokens('mallory', 500), refused('tokensInFlight'), '600 + 500 is over 1000');
    assert.throws(() => b.ledger.chargeBytes('mallory', 4_000), refused('bytesPerMinute'), '7000 + 4000 is over 10000');
    b.ledger.chargeBytes('mallory', 2_000); // within what is left
    b.ledger.reserveTokens('alice', 1000)(); // alice has her own
    b.ledger.chargeBytes('alice', 10_000);
    await until(() => a.usage.usage('mallory').windowBytes === 2_000, 'a sees what mallory spends through b');
    assert.throws(() => a.ledger.chargeBytes('mallory', 1_500), (e: unknown) => e instanceof CloudError && e.code === 'TANDEM_QUOTA_EXCEEDED');
    // Tokens come back when the computation ends, on the other gateway too.
    release();
    await until(() => b.usage.usage('mallory').tokens === 0, 'the release reached b');
    b.ledger.reserveTokens('mallory', 1000)();
    // A closed gateway's reports are deleted: its bytes no longer count.
    await a.usage.close();
    await until(() => b.usage.usage('mallory').windowBytes === 0, 'a\'s reports went with it');
    b.ledger.chargeBytes('mallory', 7_000);
    await b.usage.close();
  });

  it('a forged report claiming more than a minute left of its window is not believed', async () => {
    const a = await gateway('e');
    const b = await gateway('f');
    const nc = connections.at(-1)!;
    const kv = await new Kvm(nc).open(QUOTA_USAGE_BUCKET);
    const forged = { gateway: 'forger', tenant: 'victim', tokens: 2 ** 40, windowBytes: 2 ** 40, windowLeftMs: 8.64e15 };
    await kv.put(`forger-${createHash('sha256').update('victim').digest('hex').slice(0, 32)}`, JSON.stringify(forged));
    a.ledger.reserveTokens('mallory', 100);
    await until(() => b.usage.usage('mallory').tokens === 100, 'b sees a\'s tokens');
    assert.deepEqual(b.usage.usage('victim'), { tokens: 0, windowBytes: 0, windowsEndAt: Infinity }, 'the forged report is not believed');
    b.ledger.chargeBytes('victim', 10_000);
    await a.usage.close();
    await b.usage.close();
  });

  it('a refusal for bytes spent elsewhere says when those bytes come back; a tenant holding nothing is reported once more, then forgotten', async () => {
    const a = await gateway('g');
    const b = await gateway('h');
    // a's minute for mallory began 50 s ago: its bytes come back in about 10 s.
    a.ledger.chargeBytes('mallory', 9_000, Date.now() - 50_000);
    await until(() => b.usage.usage('mallory').windowBytes === 9_000, 'b sees a\'s bytes');
    assert.throws(() => b.ledger.chargeBytes('mallory', 2_000), (e: unknown) => e instanceof CloudError && /retry in (9|10) s/.test(e.message), 'when a\'s minute ends, not b\'s own');
    await a.usage.close();
    await b.usage.close();
    const ledger = new QuotaLedger({ bytesPerMinute: 10_000 });
    const now = 1_000_000;
    ledger.chargeBytes('mallory', 500, now);
    assert.equal(ledger.shared(now).get('mallory')?.windowBytes, 500);
    const later = now + 61_000;
    assert.deepEqual(ledger.shared(later).get('mallory'), { tokens: 0, windowBytes: 0, windowEndsAt: now + 60_000 }, 'once more, all zero');
    assert.equal(ledger.shared(later).has('mallory'), false, 'then forgotten');
  });

  it('a gateway gone without closing stops counting once its report is stale', async () => {
    const a = await gateway('c');
    const b = await gateway('d');
    a.ledger.reserveTokens('mallory', 900);
    await until(() => b.usage.usage('mallory').tokens === 900, 'b sees a\'s tokens');
    // As if a had died: its last report stays in the bucket, and counts until it is STALE_MS old.
    await connections.at(-2)!.close();
    const now = Date.now();
    assert.equal(b.usage.usage('mallory', now).tokens, 900);
    assert.equal(b.usage.usage('mallory', now + STALE_MS + 1).tokens, 0);
    await b.usage.close();
  });

  it('two gateways: a tenant\'s data-plane bytes per minute through one count on the other', async () => {
    const quotas = { bytesPerMinute: 64 * 1024 };
    const a = await startGateway(nats.url, { quotas });
    const b = await startGateway(nats.url, { quotas });
    try {
      const key = await createTenantKey(a as unknown as TestNode, 'mallory');
      const shape: [number, number, number] = [1, 32, HIDDEN]; // 8 KiB of h_B a message
      const send = async (client: TestClient): Promise<string> => {
        const reply = await client.request(client.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)], false, 'no-such-session'));
        return reply.body.case === 'error' ? reply.body.value.code : reply.body.case;
      };
      const throughA = await TestClient.connect(a, key);
      for (let i = 0; i < 6; i++) assert.equal(await send(throughA), 'TANDEM_SESSION_UNKNOWN', 'charged, then refused for its session');
      const throughB = await TestClient.connect(b, key);
      // An observer's watch sees a's report; b's watch, as quick, gets a moment more.
      const observer = await gateway('observer');
      await until(() => observer.usage.usage('mallory').windowBytes >= 6 * 8192, 'a reported what mallory spent');
      await observer.usage.close();
      await new Promise((r) => setTimeout(r, 300));
      const codes: string[] = [];
      for (let i = 0; i < 6; i++) codes.push(await send(throughB));
      const passed = codes.filter((c) => c === 'TANDEM_SESSION_UNKNOWN').length;
      assert.ok(passed < 3 && codes.at(-1) === 'TANDEM_QUOTA_EXCEEDED', `through b after 48 KiB through a: ${codes.join(', ')}`);
    } finally {
      await a.remove();
      await b.remove();
    }
  });
});
