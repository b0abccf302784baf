// Finding 7 of issue #9: any tenant could fill the disk with emulator bundles built on
// request. Bundles are now bounded per tenant (its storedBundles quota) and in total, the least
// recently used evicted first.
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { api, createTenantKey, startTestNode } from './helpers.ts';
import { assertReady, goodTenant } from './tenancy-helpers.ts';

const bundlePath = (bottom: number, top: number, keep: number) => `/v1/models/stories260K/emulators?keep=${keep}&bottom=${bottom}&top=${top}`;
const keyOf = (bottom: number, top: number, keep: number) => new RegExp(`-b${bottom}-t${top}-k${keep}-f32$`);

describe('emulator bundles on disk', () => {
  it('keep at most storedBundles per tenant and maxBundles in total, evicting the least recently used', async () => {
    const node = await startTestNode({ quotas: { storedBundles: 2 }, emulatorStorage: { maxBundles: 3 } });
    const good = await goodTenant(node);
    const stored = async () => (await readdir(join(node.stateDir, 'emulators'))).sort();
    const fetchBundle = async (key: string, [b, t, k]: [number, number, number]) => {
      const r = await api(node, 'GET', bundlePath(b, t, k), key);
      assert.equal(r.status, 200, JSON.stringify(r.json));
    };
    const has = (names: string[], cut: [number, number, number]) => names.some((n) => keyOf(...cut).test(n));

    await fetchBundle(good.key, [2, 2, 1]);
    const mallory = await createTenantKey(node, 'mallory');
    const requests: [number, number, number][] = [[1, 1, 2], [1, 1, 3], [0, 1, 2], [0, 1, 3]];
    for (const [i, cut] of requests.entries()) {
      await fetchBundle(mallory, cut);
      if (i === 1) await good.step();
    }
    let names = await stored();
    assert.equal(names.length, 3, names.join(', '));
    assert.ok(has(names, [2, 2, 1]), "the other tenant's bundle stays");
    assert.ok(has(names, [0, 1, 2]) && has(names, [0, 1, 3]), "the attacker's two most recent stay");
    assert.ok(!has(names, [1, 1, 2]) && !has(names, [1, 1, 3]), 'its older ones were evicted');

    // Over the total: the least recently used of all goes, whoever built it.
    const alice = await createTenantKey(node, 'alice');
    await fetchBundle(alice, [1, 2, 2]);
    names = await stored();
    assert.equal(names.length, 3);
    assert.ok(has(names, [1, 2, 2]) && !has(names, [2, 2, 1]), 'the least recently used bundle was evicted for the total');
    // An evicted bundle is simply built again on request.
    await fetchBundle(good.key, [2, 2, 1]);
    await good.step();
    await assertReady(node);
  });

  it('refuses a keep or cut the model cannot have before making room for it: the tenant\'s bundles stay (found by fuzzing)', async () => {
    const node = await startTestNode({ quotas: { storedBundles: 2 } });
    const alice = await createTenantKey(node, 'alice');
    for (const cut of [[1, 1, 2], [1, 1, 3]] as [number, number, number][]) assert.equal((await api(node, 'GET', bundlePath(...cut), alice)).status, 200);
    for (const [query, code] of [['keep=99', 'TANDEM_EMULATOR_KEEP_INVALID'], ['keep=1e300', 'TANDEM_EMULATOR_KEEP_INVALID'], ['keep=2&bottom=1e300', 'TANDEM_EMULATOR_OPTION_INVALID'], ['keep=2&bottom=3&top=2', 'TANDEM_EMULATOR_OPTION_INVALID']] as const) {
      const r = await api(node, 'GET', `/v1/models/stories260K/emulators?${query}`, alice);
      assert.deepEqual([r.status, r.json.code], [400, code], `${query}: ${JSON.stringify(r.json)}`);
    }
    const names = (await readdir(join(node.stateDir, 'emulators'))).sort();
    assert.ok(names.some((n) => keyOf(1, 1, 2).test(n)) && names.some((n) => keyOf(1, 1, 3).test(n)), `both of alice's bundles stay: ${names.join(', ')}`);
  });

  it('keeps the bytes on disk within maxBytes: a new bundle evicts the least recently used ones', async () => {
    const node = await startTestNode({ emulatorStorage: { maxBytes: 1 } });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'alice');
    for (const [b, t, k] of [[1, 1, 2], [1, 1, 3], [0, 1, 2]]) {
      const r = await api(node, 'GET', bundlePath(b, t, k), key);
      assert.equal(r.status, 200, JSON.stringify(r.json));
      const names = (await readdir(join(node.stateDir, 'emulators'))).sort();
      assert.equal(names.length, 1, 'every bundle is over 1 byte: only the newest stays');
      assert.match(names[0], keyOf(b, t, k));
    }
    await good.step();
    await assertReady(node);
  });

  it('refuses more concurrent builds than the quota with 429 TANDEM_QUOTA_EXCEEDED naming storedBundles', async () => {
    const node = await startTestNode({ quotas: { storedBundles: 1 } });
    const good = await goodTenant(node);
    const mallory = await createTenantKey(node, 'mallory');
    const replies = await Promise.all([[1, 1, 2], [1, 1, 3], [0, 1, 2]].map(([b, t, k]) => api(node, 'GET', bundlePath(b, t, k), mallory)));
    await good.step();
    const refused = replies.filter((r) => r.status === 429);
    assert.ok(refused.length >= 1, replies.map((r) => r.status).join(', '));
    assert.equal(refused[0].json.code, 'TANDEM_QUOTA_EXCEEDED');
    assert.deepEqual({ quota: (refused[0].json.details as Record<string, unknown>).quota, limit: (refused[0].json.details as Record<string, unknown>).limit }, { quota: 'storedBundles', limit: 1 });
    assert.ok((await readdir(join(node.stateDir, 'emulators'))).length <= 1);
    await good.step();
    await assertReady(node);
  });
});
