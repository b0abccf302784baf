// Finding 5 of issue #9, the session half: strings from the Hello are bounded, a step rewrites
// its own session's record only (not a file of every session), idle sessions expire and closed
// ones are pruned; a session store of earlier builds (one sessions.json) is migrated.
import assert from 'node:assert/strict';
import { readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { HELLO_STRING_LIMITS, SESSIONS_DIR, SESSIONS_FILE } from '../../cloud-node/index.ts';
import { TestClient, api, assertError, createTenantKey, helloBody, startTestNode, tempDir } from './helpers.ts';
import { assertReady, errorDetails, goodTenant } from './tenancy-helpers.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function recordFiles(stateDir: string): Promise<Map<string, string>> {
  const dir = join(stateDir, SESSIONS_DIR);
  const out = new Map<string, string>();
  for (const name of await readdir(dir)) {
    const s = await stat(join(dir, name));
    out.set(name, `${s.ino}:${s.size}:${s.mtimeMs}`);
  }
  return out;
}

describe('sessions: bounded strings, per-session records, expiry and pruning', () => {
  it('refuses a Hello with an oversized client build or method list with TANDEM_FIELD_TOO_LONG, storing nothing', async () => {
    const node = await startTestNode();
    const good = await goodTenant(node);
    const attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
    const before = await recordFiles(node.stateDir);
    const huge = await attacker.request(helloBody({ clientBuild: 'x'.repeat(10_000) }));
    const details = errorDetails(huge, 'TANDEM_FIELD_TOO_LONG');
    assert.equal(details.field, 'hello.client_build');
    assert.equal(details.limit, `${HELLO_STRING_LIMITS.clientBuild} characters`);
    await good.step();
    const many = await attacker.request(helloBody({ training: { methods: Array.from({ length: 2000 }, (_, i) => `m${i}`), cloudMiddleLora: false, middleLoraRank: 0 } }));
    assert.equal(errorDetails(many, 'TANDEM_FIELD_TOO_LONG').field, 'hello.training.methods');
    const long = await attacker.request(helloBody({ training: { methods: ['y'.repeat(10_000)], cloudMiddleLora: false, middleLoraRank: 0 } }));
    assert.equal(errorDetails(long, 'TANDEM_FIELD_TOO_LONG').field, 'hello.training.methods[0]');
    assert.deepEqual([...(await recordFiles(node.stateDir)).keys()], [...before.keys()], 'no record was written for the refused Hellos');
    await good.step();
    await assertReady(node);
  });

  it("a step rewrites its own session's record only, however many sessions other tenants hold", async () => {
    const node = await startTestNode();
    const good = await goodTenant(node);
    const attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
    for (let i = 0; i < 20; i++) await attacker.request(helloBody({ clientBuild: 'z'.repeat(HELLO_STRING_LIMITS.clientBuild) }));
    await good.step();
    const before = await recordFiles(node.stateDir);
    assert.equal(before.size, 21, 'one record file per session');
    await good.step();
    const after = await recordFiles(node.stateDir);
    const changed = [...after].filter(([name, version]) => before.get(name) !== version).map(([name]) => name);
    assert.deepEqual(changed, [`${good.client.sessionId}.json`], "only the stepping session's record was written");
    const record = JSON.parse(await readFile(join(node.stateDir, SESSIONS_DIR, `${good.client.sessionId}.json`), 'utf8')) as { lastStep: number };
    assert.equal(record.lastStep, 1, 'the record holds the acknowledged step');
    assert.ok((await stat(join(node.stateDir, SESSIONS_DIR, `${good.client.sessionId}.json`))).size < 4096, 'a record is small');
    await assertReady(node);
  });

  it('closes idle sessions with reason expired; a request on one gets TANDEM_SESSION_CLOSED; active sessions stay open', async () => {
    const node = await startTestNode({ sessions: { idleMs: 1500 }, sweepIntervalMs: 100 });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const idle = await TestClient.connect(node, key);
    await idle.hello();
    const beating = await TestClient.connect(node, key);
    await beating.hello();
    for (let i = 0; i < 8; i++) {
      await good.step();
      assert.equal((await beating.request({ case: 'heartbeat', value: { sessionId: beating.sessionId, sequence: i, sentAtMs: Date.now() } })).body.case, 'heartbeat');
      await sleep(300);
    }
    const listed = await api(node, 'GET', `/v1/sessions/${idle.sessionId}`, key);
    assert.equal(listed.json.state, 'closed');
    assert.equal(listed.json.closeReason, 'expired');
    assertError(await idle.request(idle.forwardBody(0, 0, [])), 'TANDEM_SESSION_CLOSED');
    assert.equal((await api(node, 'GET', `/v1/sessions/${good.client.sessionId}`, good.key)).json.state, 'open', 'the stepping session did not expire');
    assert.equal((await api(node, 'GET', `/v1/sessions/${beating.sessionId}`, key)).json.state, 'open', 'heartbeats keep a session alive');
    await good.step();
    await assertReady(node);
  });

  it('prunes closed sessions after the retention time, and beyond the per-tenant count', async () => {
    const node = await startTestNode({ sessions: { closedRetentionMs: 60 * 60 * 1000, closedPerTenant: 2 }, sweepIntervalMs: 100 });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const attacker = await TestClient.connect(node, key);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      await attacker.hello();
      ids.push(attacker.sessionId);
      await attacker.request({ case: 'sessionClose', value: { sessionId: attacker.sessionId, reason: 'completed', message: '' } });
    }
    await good.step();
    const listed = (await api(node, 'GET', '/v1/sessions', key)).json.sessions as { id: string }[];
    assert.deepEqual(listed.map((s) => s.id).sort(), ids.slice(3).sort(), 'the two most recently closed are kept');
    assert.equal((await api(node, 'GET', `/v1/sessions/${ids[0]}`, key)).json.code, 'TANDEM_SESSION_UNKNOWN');
    assert.ok(!(await recordFiles(node.stateDir)).has(`${ids[0]}.json`), 'its record file is gone');

    const short = await startTestNode({ sessions: { closedRetentionMs: 1 }, sweepIntervalMs: 100 });
    const other = await goodTenant(short);
    const shortKey = await createTenantKey(short, 'mallory');
    const closing = await TestClient.connect(short, shortKey);
    await closing.hello();
    assert.equal((await api(short, 'DELETE', `/v1/sessions/${closing.sessionId}`, shortKey)).status, 200);
    await sleep(500);
    assert.equal((await api(short, 'GET', `/v1/sessions/${closing.sessionId}`, shortKey)).status, 404, 'pruned after the retention time');
    await other.step();
    await assertReady(short);
  });

  it('migrates the single sessions.json of earlier builds into record files, and resumes its sessions', async () => {
    const stateDir = await tempDir();
    const first = await startTestNode({ stateDir });
    const key = await createTenantKey(first, 'alice');
    const client = await TestClient.connect(first, key);
    await client.hello();
    await client.step(0);
    client.close();
    await first.close();
    // Rewrite the state as an earlier build kept it.
    const record = JSON.parse(await readFile(join(stateDir, SESSIONS_DIR, `${client.sessionId}.json`), 'utf8')) as unknown;
    await rm(join(stateDir, SESSIONS_DIR), { recursive: true });
    await writeFile(join(stateDir, SESSIONS_FILE), JSON.stringify({ version: 1, sessions: [record] }));

    const second = await startTestNode({ stateDir });
    assert.deepEqual(await readdir(join(stateDir, SESSIONS_DIR)), [`${client.sessionId}.json`]);
    assert.ok(!(await readdir(stateDir)).includes(SESSIONS_FILE), 'the old file is gone once split');
    const back = await TestClient.connect(second, key);
    const reopened = await back.request({ case: 'sessionOpen', value: { sessionId: client.sessionId, resumeStep: 1 } });
    assert.equal(reopened.body.case, 'welcome');
    back.sessionId = client.sessionId;
    await back.step(1);
    assert.equal((await api(second, 'GET', `/v1/sessions/${client.sessionId}`, key)).json.lastStep, 1);
  });
});
