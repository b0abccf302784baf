// Finding 9 of issue #9, the state-file items: the state folder is 0700 and its files 0600
// (keys.json was 0644), and temporary files a hard kill left behind are removed at start.
import assert from 'node:assert/strict';
import { chmod, mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import { KEYS_FILE, SESSIONS_DIR } from '../../cloud-node/index.ts';
import { TestClient, createTenantKey, startTestNode, tempDir } from './helpers.ts';
import { assertReady, goodTenant } from './tenancy-helpers.ts';

const modeOf = async (path: string): Promise<number> => (await stat(path)).mode & 0o777;

describe('state files', () => {
  it('are 0600 in 0700 folders, also when an earlier build left them 0755/0644', async () => {
    const stateDir = await tempDir();
    const first = await startTestNode({ stateDir });
    const good = await goodTenant(first);
    await good.step();
    assert.equal(await modeOf(stateDir), 0o700);
    assert.equal(await modeOf(join(stateDir, KEYS_FILE)), 0o600);
    assert.equal(await modeOf(join(stateDir, SESSIONS_DIR)), 0o700);
    for (const name of await readdir(join(stateDir, SESSIONS_DIR))) assert.equal(await modeOf(join(stateDir, SESSIONS_DIR, name)), 0o600, name);
    await first.close();

    await chmod(stateDir, 0o755);
    await chmod(join(stateDir, KEYS_FILE), 0o644);
    const second = await startTestNode({ stateDir });
    assert.equal(await modeOf(stateDir), 0o700);
    assert.equal(await modeOf(join(stateDir, KEYS_FILE)), 0o600);
    await assertReady(second);
  });

  it('removes the temporary files a hard kill left, and serves the other tenants as before', async () => {
    const stateDir = await tempDir();
    const first = await startTestNode({ stateDir });
    const key = await createTenantKey(first, 'alice');
    const client = await TestClient.connect(first, key);
    await client.hello();
    await client.step(0);
    client.close();
    await first.close();
    // What a kill -9 in the middle of writes leaves behind.
    const stale = [
      join(stateDir, `${KEYS_FILE}.tmp-4242-0badc0de`),
      join(stateDir, SESSIONS_DIR, `${client.sessionId}.json.tmp-4242-12345678`),
    ];
    for (const path of stale) await writeFile(path, '{"half": ');
    const building = join(stateDir, 'emulators', '.0123456789abcdef-b2-t2-k1-f32.cafe0123');
    await mkdir(building, { recursive: true });
    await writeFile(join(building, 'emulator.safetensors'), new Uint8Array(1024));

    const second = await startTestNode({ stateDir });
    for (const path of stale) await assert.rejects(stat(path), { code: 'ENOENT' }, path);
    await assert.rejects(stat(building), { code: 'ENOENT' });
    // The real state is intact: the session resumes, and a second tenant steps.
    const back = await TestClient.connect(second, key);
    assert.equal((await back.request({ case: 'sessionOpen', value: { sessionId: client.sessionId, resumeStep: 1 } })).body.case, 'welcome');
    back.sessionId = client.sessionId;
    await back.step(1);
    const good = await goodTenant({ ...second, adminKey: first.adminKey });
    await good.step();
    await assertReady(second);
  });

  it('`tandem keys create` makes the state folder 0700 and keys.json 0600', async () => {
    const stateDir = join(await tempDir(), 'fresh');
    assert.equal(await main(['keys', 'create', '--tenant', 'alice', '--state', stateDir], { out: () => undefined, log: () => undefined }), 0);
    assert.equal(await modeOf(stateDir), 0o700);
    assert.equal(await modeOf(join(stateDir, KEYS_FILE)), 0o600);
  });
});
