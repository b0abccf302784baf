// Federation with real processes: one cloud node (`tandem cloud`) and three owners
// (`tandem edge federate`), each its own process, on loopback. FedAvg is checked against the
// weighted average of the updates the owners report; an owner killed mid-round does not stall
// the round and rejoins; the cloud killed mid-round resumes it with every acknowledged update;
// each bad update gets its typed error and the round goes on.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { readAdapterFolder } from '../../edge-client/index.ts';
import { LlamaModel, createAdapter, initBackend, loadModelFolder, saveAdapter } from '../../model/index.ts';
import { decodeFloat32, decodeUint32, encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate, WireAdapter } from '../../protocol/index.ts';
import { STORIES, api, flatOf, run, startCloud, status, tempDir, tenantKey, until } from './federation-processes.ts';
import type { Cloud, Proc } from './federation-processes.ts';

let initial: WireAdapter | undefined;
/** LoRA r=2 on q_proj and v_proj of stories260K, B set to small values so every tensor moves. */
async function initialAdapter(): Promise<WireAdapter> {
  if (initial) return initial;
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'] }], { seed: 3 });
  const dir = await tempDir();
  await saveAdapter(adapter, dir);
  adapter.dispose();
  initial = await readAdapterFolder(dir);
  return initial;
}

/** Three owners with different text (non-IID), a few dozen lines each. */
async function ownerData(dir: string): Promise<Record<string, string>> {
  const topics: Record<string, string[]> = {
    alice: ['the cat sat on the mat', 'the cat ran to the tree', 'a little cat was happy'],
    bob: ['the dog went to the park', 'a big dog found a ball', 'the dog was very tired'],
    carol: ['lily saw a red bird', 'the bird sang a song', 'lily and the bird played'],
  };
  const files: Record<string, string> = {};
  for (const [owner, lines] of Object.entries(topics)) {
    const rows = Array.from({ length: owner === 'bob' ? 48 : 24 }, (_, i) => JSON.stringify({ text: `${lines[i % 3]} ${i}.` }));
    files[owner] = join(dir, `${owner}.jsonl`);
    await writeFile(files[owner], `${rows.join('\n')}\n`);
  }
  return files;
}

function owner(cloud: Cloud, key: string, federation: string, data: string, work: string): Proc {
  return run(['edge', 'federate', '--cloud', cloud.url, '--key', key, '--federation', federation, '--data', data, '--model', STORIES, '--work', work,
    '--poll', '100', '--batch-size', '4', '--seq-len', '16', '--lr', '0.01', '--backend', 'wasm', '--json']);
}

async function create(cloud: Cloud, body: Partial<FederationCreate>): Promise<void> {
  const full: FederationCreate = {
    id: 'f', model: 'stories260K', mode: 'offsite', adapter: await initialAdapter(), rounds: 1, owners: ['alice', 'bob', 'carol'], sampleSize: 3, minOwners: 2,
    localSteps: 2, roundDeadlineSeconds: 60, aggregation: 'fedavg', secureAggregation: false, ...body,
  };
  const { status, json } = await api(cloud, 'POST', '/v1/federations', cloud.adminKey, full);
  assert.equal(status, 201, JSON.stringify(json));
}

interface RoundLine {
  event: string;
  round: number;
  attempt: number;
  examples: number;
  accepted: boolean;
  update: string;
}
const roundLine = (p: Proc, round: number): RoundLine | undefined => p.lines.map((l) => JSON.parse(l) as RoundLine).find((l) => l.event === 'round' && l.round === round && l.accepted);

describe('federation with real processes', { timeout: 600_000 }, () => {
  it('FedAvg of three owners equals the weighted average; an owner killed mid-round does not stall it and rejoins', async () => {
    const dir = await tempDir();
    const cloud = await startCloud(join(dir, 'state'));
    const keys = { alice: await tenantKey(cloud, 'alice'), bob: await tenantKey(cloud, 'bob'), carol: await tenantKey(cloud, 'carol') };
    const data = await ownerData(dir);
    // The owners join before the federation exists (they wait for it), so round 1's deadline is only training time.
    const owners = Object.fromEntries((['alice', 'bob', 'carol'] as const).map((o) => [o, owner(cloud, keys[o], 'fedavg', data[o], join(dir, `work-${o}`))]));
    await Promise.all(Object.values(owners).map((p) => p.waitFor(/"event":"ready"/)));
    // carol is killed in round 2: it closes once she has been silent for 5 s (the owners beat every 5/3 s
    // while they train), long before its deadline.
    await create(cloud, { id: 'fedavg', rounds: 3, roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5 });
    const before = flatOf((await api(cloud, 'GET', '/v1/federations/fedavg/adapter', cloud.adminKey)).json as unknown as WireAdapter);

    // Round 1: every owner; the new global adapter is the examples-weighted mean of their deltas.
    const r1 = await until(async () => ((await status(cloud, 'fedavg')).history.length >= 1 ? (await status(cloud, 'fedavg')) : undefined), 'round 1', 300_000);
    const after1 = flatOf((await api(cloud, 'GET', '/v1/federations/fedavg/adapter', cloud.adminKey)).json as unknown as WireAdapter);
    // carol is killed as soon as she starts training round 2 (alice and bob may already be done with it).
    await owners.carol.waitFor(/"event":"training","round":2/);
    owners.carol.child.kill('SIGKILL');
    const deadline2 = Date.parse((await status(cloud, 'fedavg')).current.deadline);
    // The last owner's ack may still be on its way when the status shows the round: wait for each owner's own line.
    for (const o of ['alice', 'bob'] as const) await owners[o].waitFor(/"event":"round","round":1,.*"accepted":true/);
    const lines = (['alice', 'bob', 'carol'] as const).map((o) => roundLine(owners[o], 1)!);
    assert.deepEqual(r1.history[0].participants, ['alice', 'bob', 'carol']);
    const total = lines.reduce((s, l) => s + l.examples, 0);
    assert.equal(r1.history[0].examples, total);
    assert.ok(lines[1].examples > lines[0].examples, 'bob has more data, so more weight');
    const updates = lines.map((l) => decodeFloat32(l.update)!);
    let moved = 0;
    for (let i = 0; i < before.length; i++) {
      const want = before[i] + updates.reduce((s, u, k) => s + (lines[k].examples / total) * u[i], 0);
      assert.ok(Math.abs(after1[i] - want) <= 1e-6 + 1e-5 * Math.abs(want), `value ${i}: ${after1[i]} vs ${want}`);
      if (after1[i] !== before[i]) moved++;
    }
    assert.ok(moved > before.length / 4, `the global adapter moved (${moved} of ${before.length} values)`);

    // Round 2 completes with the two owners left (above minOwners 2) once carol is taken as gone, not at its deadline.
    const r2 = await until(async () => {
      const s = await status(cloud, 'fedavg');
      return s.history.length >= 2 ? s : undefined;
    }, 'round 2', 300_000);
    assert.deepEqual(r2.history[1].participants, ['alice', 'bob']);
    assert.ok(Date.parse(r2.history[1].completedAt) < deadline2 - 300_000, `round 2 closed at ${r2.history[1].completedAt}, its deadline ${new Date(deadline2).toISOString()}`);
    assert.deepEqual(r2.history[1].sampled, ['alice', 'bob', 'carol']);
    // carol rejoins and takes part in round 3.
    const carol = owner(cloud, keys.carol, 'fedavg', data.carol, join(dir, 'work-carol-2'));
    await carol.waitFor(/"event":"done"/);
    const done = await status(cloud, 'fedavg');
    assert.equal(done.state, 'done');
    assert.deepEqual(done.history[2].participants, ['alice', 'bob', 'carol']);
    assert.ok(done.history.every((h) => h.loss !== null && h.bytesReceived === h.participants.length * before.length * 4));
    assert.ok(Object.keys(done.history[2].validation).length === 3, 'owners report validation metrics');
    await Promise.all([owners.alice.exited, owners.bob.exited]);
    cloud.proc.child.kill('SIGTERM');
    await cloud.proc.exited;
  });

  it('the cloud killed mid-round resumes it with every acknowledged update; bad updates get typed errors and the round goes on', async () => {
    const dir = await tempDir();
    const state = join(dir, 'state');
    let cloud = await startCloud(state);
    const keys = { alice: await tenantKey(cloud, 'alice'), bob: await tenantKey(cloud, 'bob'), carol: await tenantKey(cloud, 'carol'), mallory: await tenantKey(cloud, 'mallory') };
    const data = await ownerData(dir);
    await create(cloud, { id: 'restart', rounds: 1, minOwners: 3, roundDeadlineSeconds: 300 });
    const alice = owner(cloud, keys.alice, 'restart', data.alice, join(dir, 'wa'));
    await until(async () => ((await status(cloud, 'restart')).current.received.includes('alice') ? true : undefined), 'alice acknowledged');
    await alice.waitFor(/"event":"round".*"accepted":true/);

    // Bad updates, each refused with its code, none aggregated.
    const size = flatOf(await initialAdapter()).length;
    const good = { attempt: 0, examples: 5, loss: 1, values: encodeFloat32(new Float32Array(size).fill(0.001)) };
    const post = (key: string, body: unknown, round = 1, id = 'restart') => api(cloud, 'POST', `/v1/federations/${id}/rounds/${round}/updates`, key, body);
    const expect = async (p: Promise<{ status: number; json: Record<string, unknown> }>, code: string, httpStatus: number): Promise<void> => {
      const { status: s, json } = await p;
      assert.equal(json.code, code, JSON.stringify(json));
      assert.equal(s, httpStatus);
    };
    await expect(post(keys.bob, { ...good, values: encodeFloat32(new Float32Array(size - 1)) }), 'TANDEM_FED_UPDATE_SHAPE', 400);
    const nan = new Float32Array(size);
    nan[7] = NaN;
    await expect(post(keys.bob, { ...good, values: encodeFloat32(nan) }), 'TANDEM_FED_UPDATE_NON_FINITE', 400);
    await expect(post(keys.alice, good), 'TANDEM_FED_UPDATE_REPLAY', 409);
    await expect(post(keys.bob, good, 0), 'TANDEM_FED_UPDATE_LATE', 409);
    await expect(post(keys.bob, { ...good, attempt: 1 }), 'TANDEM_FED_UPDATE_LATE', 409);
    await expect(post(keys.mallory, good), 'TANDEM_FED_NOT_INVITED', 403);
    await expect(post(keys.bob, { ...good, examples: -3 }), 'TANDEM_FED_UPDATE_SHAPE', 400);
    const st = await status(cloud, 'restart');
    assert.deepEqual(st.current.received, ['alice']);
    assert.equal(st.rejected.TANDEM_FED_UPDATE_SHAPE, 2);
    // Not sampled: a federation sampling one of two owners.
    await create(cloud, { id: 'sampled', rounds: 1, owners: ['alice', 'bob'], sampleSize: 1, minOwners: 1 });
    const [chosen] = (await status(cloud, 'sampled')).current.sampled;
    const other = chosen === 'alice' ? 'bob' : 'alice';
    await expect(post(keys[other], good, 1, 'sampled'), 'TANDEM_FED_NOT_SAMPLED', 403);
    const ok = await post(keys[chosen as 'alice' | 'bob'], good, 1, 'sampled');
    assert.equal(ok.status, 200, JSON.stringify(ok.json));
    assert.equal((await status(cloud, 'sampled')).state, 'done');

    // bob's update is acknowledged, then the cloud is killed.
    const bob = owner(cloud, keys.bob, 'restart', data.bob, join(dir, 'wb'));
    // The promise is about acknowledged updates: the status lists bob's as soon as it is taken,
    // while its write to disk may still be under way; bob's ack comes after that write.
    await bob.waitFor(/"event":"round".*"accepted":true/);
    cloud.proc.child.kill('SIGKILL');
    await cloud.proc.exited;
    const persisted = JSON.parse(await readFile(join(state, 'federations', 'restart.json'), 'utf8')) as { received: Record<string, unknown> };
    assert.deepEqual(Object.keys(persisted.received).sort(), ['alice', 'bob']);
    cloud = await startCloud(state, cloud.port, cloud.adminKey);
    const resumed = await status(cloud, 'restart');
    assert.equal(resumed.round, 1);
    assert.deepEqual(resumed.current.received, ['alice', 'bob']);
    const carol = owner(cloud, keys.carol, 'restart', data.carol, join(dir, 'wc'));
    await carol.waitFor(/"event":"done"/);
    const done = await status(cloud, 'restart');
    assert.equal(done.state, 'done');
    assert.deepEqual(done.history[0].participants, ['alice', 'bob', 'carol']);
    await Promise.all([alice.exited, bob.exited]);
    cloud.proc.child.kill('SIGTERM');
    await cloud.proc.exited;
  });

  it('with SecAgg the cloud learns only the sum, equal to the plain weighted sum within the fixed-point step; a killed owner is recovered through seed shares', async () => {
    const dir = await tempDir();
    const state = join(dir, 'state');
    const cloud = await startCloud(state);
    const keys = { alice: await tenantKey(cloud, 'alice'), bob: await tenantKey(cloud, 'bob'), carol: await tenantKey(cloud, 'carol') };
    const data = await ownerData(dir);
    const owners = Object.fromEntries((['alice', 'bob', 'carol'] as const).map((o) => [o, owner(cloud, keys[o], 'secure', data[o], join(dir, `w-${o}`))]));
    await Promise.all(Object.values(owners).map((p) => p.waitFor(/"event":"ready"/)));
    // carol, killed, is taken as gone 5 s after her last call: the reveal begins then, long before the deadline.
    await create(cloud, { id: 'secure', rounds: 1, minOwners: 2, roundDeadlineSeconds: 600, ownerTimeoutSeconds: 5, secureAggregation: true });
    const opened = Date.now();
    const before = flatOf((await api(cloud, 'GET', '/v1/federations/secure/adapter', cloud.adminKey)).json as unknown as WireAdapter);
    // carol starts training only after her keys and seed shares are in: killing her then is a dropout SecAgg must recover.
    await owners.carol.waitFor(/"event":"training","round":1/);
    owners.carol.child.kill('SIGKILL');
    // While the round waits for its deadline, the cloud's state holds alice's and bob's masked inputs.
    const masked = await until(async () => {
      const s = JSON.parse(await readFile(join(state, 'federations', 'secure.json'), 'utf8')) as { secagg?: { masked: Record<string, string> } };
      return s.secagg && Object.keys(s.secagg.masked).length === 2 ? s.secagg.masked : undefined;
    }, 'masked inputs of alice and bob', 60_000).catch(async (e: unknown) => {
      throw new Error(`${String(e)}; alice: ${owners.alice.lines.map((l) => l.slice(0, 300)).join(' / ')}; state: ${(await readFile(join(state, 'federations', 'secure.json'), 'utf8')).slice(0, 3000)}`);
    });
    await Promise.all([owners.alice.exited, owners.bob.exited]);
    const done = await status(cloud, 'secure');
    assert.equal(done.state, 'done');
    assert.deepEqual(done.history[0].participants, ['alice', 'bob']);
    assert.ok(Date.parse(done.history[0].completedAt) < opened + 300_000, `the round closed at ${done.history[0].completedAt}, half its deadline after it opened is ${new Date(opened + 300_000).toISOString()}`);
    const lines = [roundLine(owners.alice, 1)!, roundLine(owners.bob, 1)!];
    const updates = lines.map((l) => decodeFloat32(l.update)!);
    const total = lines[0].examples + lines[1].examples;
    const after = flatOf((await api(cloud, 'GET', '/v1/federations/secure/adapter', cloud.adminKey)).json as unknown as WireAdapter);
    const step = 2 ** -16;
    for (let i = 0; i < before.length; i++) {
      const want = before[i] + (lines[0].examples * updates[0][i] + lines[1].examples * updates[1][i]) / total;
      assert.ok(Math.abs(after[i] - want) <= (2 * step) / total + 2e-7 * Math.max(1, Math.abs(want)), `value ${i}: ${after[i]} vs ${want}`);
    }
    // alice's masked input is not her update: decoded, it is noise of the ring's scale.
    const ring = decodeUint32(masked.alice)!;
    const decoded = Float32Array.from(ring, (v) => (v | 0) * step);
    const meanAbs = decoded.reduce((s, v) => s + Math.abs(v), 0) / decoded.length;
    const plainMeanAbs = updates[0].reduce((s, v) => s + Math.abs(v * lines[0].examples), 0) / decoded.length;
    assert.ok(meanAbs > 1000 && plainMeanAbs < 10, `masked mean |x| ${meanAbs}, plain ${plainMeanAbs}`);
    cloud.proc.child.kill('SIGTERM');
    await cloud.proc.exited;
  });
});
