// Finding 8 of issue #9, the key half: a revoked key fails on the next request (no cached
// lookup outlives the keys file) and its open sockets are disconnected with a typed reason the
// edge shows; listings show prefixes only; reserved tenant names are refused.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import { DISCONNECT_REASON_EVENT, RESERVED_TENANTS } from '../../cloud-node/index.ts';
import type { KeyView } from '../../cloud-node/index.ts';
import { EdgeError, connectCloud } from '../../edge-client/index.ts';
import { TestClient, api, createTenantKey, startTestNode } from './helpers.ts';
import { assertReady, goodTenant } from './tenancy-helpers.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('key revocation, listings and reserved names', () => {
  it('DELETE /v1/keys/:id: the next request is 401 TANDEM_AUTH_KEY_REVOKED and open sockets are told and disconnected', async () => {
    const node = await startTestNode();
    const good = await goodTenant(node);
    const created = await api(node, 'POST', '/v1/keys', node.adminKey, { tenant: 'mallory' });
    const { key, id } = created.json as { key: string; id: string };
    const socket = await TestClient.connect(node, key);
    await socket.hello();
    await socket.step(0);
    assert.equal((await api(node, 'GET', '/v1/models', key)).status, 200, 'the key works (and is now cached)');
    const told = new Promise<{ code: string; message: string }>((resolve) => socket.socket.once(DISCONNECT_REASON_EVENT, resolve));
    const gone = new Promise<string>((resolve) => socket.socket.once('disconnect', resolve));

    const revoked = await api(node, 'DELETE', `/v1/keys/${id}`, node.adminKey);
    assert.equal(revoked.status, 200);
    assert.equal(revoked.json.id, id);
    assert.match(revoked.json.revokedAt as string, /^\d{4}-/);
    assert.equal((await told).code, 'TANDEM_AUTH_KEY_REVOKED');
    assert.equal(await gone, 'io server disconnect');
    await good.step(); // during

    const next = await api(node, 'GET', '/v1/models', key);
    assert.equal(next.status, 401);
    assert.equal(next.json.code, 'TANDEM_AUTH_KEY_REVOKED');
    await assert.rejects(TestClient.connect(node, key), (e: Error & { data?: { code?: string } }) => e.data?.code === 'TANDEM_AUTH_KEY_REVOKED');
    assert.equal((await api(node, 'DELETE', '/v1/keys/no-such-key', node.adminKey)).json.code, 'TANDEM_KEY_UNKNOWN');
    assert.equal((await api(node, 'DELETE', `/v1/keys/${id}`, good.key)).json.code, 'TANDEM_AUTH_ADMIN_REQUIRED');
    await good.step(); // after
    await assertReady(node);
  });

  it('a key revoked by `tandem keys revoke` (another process\'s write) fails on the next request and cuts the edge with a typed reason', async () => {
    const node = await startTestNode({ sweepIntervalMs: 100 });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const edge = await connectCloud(node.url, { key, retries: 1, requestTimeoutMs: 5000 });
    const [model] = await edge.models();
    const session = await edge.openSession({ model: { id: model.id, contentHash: model.contentHash }, cut: { bottom: 2, top: 2 }, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
    assert.equal((await api(node, 'GET', '/v1/models', key)).status, 200);

    const out: string[] = [];
    const io = { out: (l: string) => out.push(l), log: () => undefined };
    assert.equal(await main(['keys', 'list', '--state', node.stateDir, '--json'], io), 0);
    const listed = (JSON.parse(out.pop()!) as { keys: KeyView[] }).keys;
    assert.ok(!JSON.stringify(listed).includes(key), '`tandem keys list` shows no key');
    const target = listed.find((k) => k.tenant === 'mallory')!;
    // By prefix, as the listing shows it, from another process's view of the state directory.
    assert.equal(await main(['keys', 'revoke', '--id', target.prefix, '--state', node.stateDir, '--json'], io), 0);
    assert.equal((JSON.parse(out.pop()!) as KeyView).id, target.id);
    assert.equal((await api(node, 'GET', '/v1/models', key)).json.code, 'TANDEM_AUTH_KEY_REVOKED', 'no stale cached lookup');
    await good.step();
    await sleep(400); // the node's periodic check of the keys file reaches open sockets
    const heartbeat = { case: 'heartbeat' as const, value: { sessionId: session.id, sequence: 1, sentAtMs: Date.now() } };
    await assert.rejects(session.request(heartbeat), (e: unknown) => e instanceof EdgeError && e.code === 'TANDEM_EDGE_AUTH_FAILED' && e.remoteCode === 'TANDEM_AUTH_KEY_REVOKED');
    edge.close();
    await good.step();
    await assertReady(node);
  });

  it('GET /v1/keys shows prefixes, never keys or hashes; reserved tenant names are refused', async () => {
    const node = await startTestNode();
    const key = await createTenantKey(node, 'alice');
    const listing = await api(node, 'GET', '/v1/keys', node.adminKey);
    assert.equal(listing.status, 200);
    const text = JSON.stringify(listing.json);
    const stored = JSON.parse(await readFile(join(node.stateDir, 'keys.json'), 'utf8')) as { keys: { sha256: string }[] };
    for (const secret of [key, node.adminKey, ...stored.keys.map((k) => k.sha256)]) assert.ok(!text.includes(secret), 'no key and no hash in the listing');
    const alice = (listing.json.keys as { tenant: string; prefix: string }[]).find((k) => k.tenant === 'alice')!;
    assert.equal(alice.prefix, key.slice(0, 12));
    assert.equal((await api(node, 'GET', '/v1/keys', key)).json.code, 'TANDEM_AUTH_ADMIN_REQUIRED');
    for (const tenant of [...RESERVED_TENANTS, 'Admin', 'ROOT']) {
      const refused = await api(node, 'POST', '/v1/keys', node.adminKey, { tenant });
      assert.equal(refused.status, 400, tenant);
      assert.equal(refused.json.code, 'TANDEM_TENANT_INVALID');
    }
    await assertReady(node);
  });
});
