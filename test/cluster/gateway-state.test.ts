// The gateways' state (keys, sessions) lives in JetStream: it survives a nats-server restart,
// a gateway on an empty state directory knows it, and an edge given two gateway URLs whose
// first is killed reattaches on the second and finishes the run as if nothing happened.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { MiddleWorkerNode } from '../../cloud-node/index.ts';
import { initBackend } from '../../model/index.ts';
import { api } from '../cloud-node/helpers.ts';
import { trainReference } from '../edge-client/helpers.ts';
import { freePort, startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { LORA, RUN, maxAdapterDiff, spawnGateway, startGateway, startWorker, stopChild, tempDir, trainThrough, until } from './helpers.ts';

describe('cluster state in JetStream', () => {
  let nats: TestNatsServer;
  let worker: MiddleWorkerNode;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    worker = await startWorker(nats.url);
  });
  after(async () => {
    await worker.close();
    await nats.close();
  });

  it('keys and sessions survive a nats-server restart and are known to a gateway on an empty state directory', async () => {
    const first = await startGateway(nats.url);
    const admin = first.adminKey as string;
    assert.ok(admin.startsWith('tdk_'), 'the first gateway of the cluster creates the admin key');
    const created = await api(first, 'POST', '/v1/keys', admin, { tenant: 'alice' });
    assert.equal(created.status, 201);
    const alice = created.json.key as string;
    await until(async () => ((await first.cluster?.status.workers()) ?? []).length === 1, 10_000, 'the worker announced');
    await trainThrough(first.url, alice);
    const sessions = (await api(first, 'GET', '/v1/sessions', alice)).json.sessions as { id: string; lastStep: number; state: string }[];
    assert.equal(sessions.length, 1);
    await first.remove();

    await nats.stop();
    await nats.start();

    const second = await startGateway(nats.url);
    try {
      const listed = await api(second, 'GET', '/v1/sessions', alice);
      assert.equal(listed.status, 200, "alice's key is known after the restart");
      assert.deepEqual((listed.json.sessions as { id: string; lastStep: number; state: string }[]).map((s) => [s.id, s.lastStep, s.state]), sessions.map((s) => [s.id, s.lastStep, s.state]));
      const keys = await api(second, 'GET', '/v1/keys', admin);
      assert.equal(keys.status, 200, 'and so is the admin key');
      assert.equal((keys.json.keys as { admin: boolean }[]).filter((k) => k.admin).length, 1, 'the second gateway made no admin key of its own');
    } finally {
      await second.remove();
    }
  });

  it('an edge given two gateways: the first is killed (SIGKILL) mid-training, the run finishes on the second with the adapter of an uninterrupted run', async () => {
    const state = await tempDir('gateways');
    const a = await spawnGateway(nats.url, `${state.dir}/a`, await freePort());
    const b = await spawnGateway(nats.url, `${state.dir}/b`, await freePort());
    try {
      assert.equal((await fetch(`${b.url}/v1/health`)).status, 200);
      // The admin key was made by the first test's gateway: neither of these makes one.
      const adminCreated = a.adminKey ?? b.adminKey;
      assert.equal(adminCreated, undefined, 'neither gateway made an admin key: the cluster has one');
      let killed = false;
      const run = await trainThrough(`${a.url},${b.url}`, await tenantKey(nats), {
        requestTimeoutMs: 8000,
        onEvent: (e) => {
          if (e.type !== 'step' || killed) return;
          killed = true;
          a.child.kill('SIGKILL');
        },
      });
      assert.ok(killed);
      const reference = await trainReference({ methods: LORA, ...RUN });
      assert.equal(run.losses.length, RUN.steps);
      run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - reference.losses[i]) <= 1e-5, `step ${i + 1}: ${loss} vs ${reference.losses[i]}`));
      assert.ok(maxAdapterDiff(reference.adapter, run.adapter) <= 1e-5);
    } finally {
      await stopChild(a.child);
      await stopChild(b.child);
      await state.remove();
    }
  });
});

/** A tenant key written straight into the cluster's key bucket. */
async function tenantKey(nats: TestNatsServer): Promise<string> {
  const { JetStreamKeyStore } = await import('../../cloud-node/state/jetstream-key-store.ts');
  const { connectNats } = await import('../../cloud-node/cluster/nats-connection.ts');
  const nc = await connectNats(nats.url, 'test-keys', 'gateway');
  try {
    const keys = await JetStreamKeyStore.open(nc);
    const { key } = await keys.create('bob');
    keys.close();
    return key;
  } finally {
    await nc.drain();
  }
}
