// A gateway's served adapters and emulator bundles live in the cluster's JetStream object store
// (tandem-files): an adapter uploaded through one gateway is there, file by file; after a
// nats-server restart a gateway on an empty state directory serves it with the same bytes, and
// deleting it there removes it from the object store. A bundle built by one gateway is in the
// state directory of another, started on an empty one, before any request for it. Gateways
// running side by side take in and drop each other's adapters as they are uploaded and deleted.
// A mirror that closes waits for its object-store calls in flight before the connection drains.
import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { JetStreamFileMirror } from '../../cloud-node/state/jetstream-file-mirror.ts';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, initBackend } from '../../model/index.ts';
import { api } from '../cloud-node/helpers.ts';
import { writeTestAdapters } from '../cloud-node/serving-fixtures.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { startGateway, tempDir, until } from './helpers.ts';

describe('adapters and emulator bundles in the JetStream object store', () => {
  let nats: TestNatsServer;
  let fixtures: { dir: string; remove(): Promise<void> };
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    fixtures = await tempDir('adapters');
  });
  after(async () => {
    await fixtures.remove();
    await nats.close();
  });

  const stored = async (folder = 'serving/adapters'): Promise<string[]> => {
    const nc = await connectNats(nats.url, 'test-objects', 'gateway');
    try {
      return await (await JetStreamFileMirror.open(nc, '/nonexistent')).names(folder);
    } finally {
      await nc.drain();
    }
  };

  it('an adapter uploaded through one gateway is served, after a nats-server restart, by a gateway on an empty state directory', async () => {
    const [dir] = await writeTestAdapters(fixtures.dir, 1);
    const weights = await readFile(join(dir, ADAPTER_WEIGHTS_FILE));
    const first = await startGateway(nats.url);
    let alice: string;
    try {
      const created = await api(first, 'POST', '/v1/keys', first.adminKey, { tenant: 'alice' });
      assert.equal(created.status, 201);
      alice = created.json.key as string;
      const models = await api(first, 'GET', '/v1/models', alice);
      const contentHash = ((models.json.models as Record<string, unknown>[])[0]).contentHash as string;
      const up = await api(first, 'POST', '/v1/adapters', alice, {
        name: 'a0', baseContentHash: contentHash,
        adapter: { config: await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8'), weights: weights.toString('base64') },
      });
      assert.equal(up.status, 201, JSON.stringify(up.json));
    } finally {
      await first.remove();
    }
    assert.deepEqual(await stored(), ['serving/adapters/alice/a0/adapter_config.json', 'serving/adapters/alice/a0/adapter_model.safetensors', 'serving/adapters/alice/a0/record.json']);

    await nats.stop();
    await nats.start();

    const second = await startGateway(nats.url);
    try {
      const listed = await api(second, 'GET', '/v1/adapters', alice);
      assert.equal(listed.status, 200);
      assert.deepEqual((listed.json.adapters as { name: string }[]).map((a) => a.name), ['a0'], 'the second gateway serves the adapter');
      const restored = await readFile(join(second.stateDir, 'serving', 'adapters', 'alice', 'a0', ADAPTER_WEIGHTS_FILE));
      assert.ok(restored.equals(weights), 'with the uploaded bytes');
      const removed = await api(second, 'DELETE', '/v1/adapters/a0', alice);
      assert.equal(removed.status, 200);
    } finally {
      await second.remove();
    }
    assert.deepEqual(await stored(), [], 'deleting it removes it from the object store');
  });

  it('an emulator bundle built through one gateway is restored by a gateway on an empty state directory', async () => {
    const query = '?keep=2&bottom=1&top=1';
    const first = await startGateway(nats.url);
    let built: { status: number; json: Record<string, unknown> };
    try {
      built = await api(first, 'GET', `/v1/models/stories260K/emulators${query}`, first.adminKey);
      assert.equal(built.status, 200, JSON.stringify(built.json));
    } finally {
      await first.remove();
    }
    const names = await stored('emulators');
    assert.ok(names.some((n) => n.endsWith('/manifest.json')) && names.some((n) => n.endsWith('/emulator.safetensors')), `the bundle's files are stored: ${names.join(', ')}`);
    const second = await startGateway(nats.url);
    try {
      const restored = (await readdir(join(second.stateDir, 'emulators'))).sort();
      assert.deepEqual(restored, [...new Set(names.map((n) => n.split('/')[1]))], 'the bundle folder is in the new state directory before any request');
      const again = await api(second, 'GET', `/v1/models/stories260K/emulators${query}`, second.adminKey);
      assert.equal(again.status, 200);
      assert.deepEqual(again.json.files, built.json.files, 'the same files, with the same hashes');
    } finally {
      await second.remove();
    }
  });

  it('a running gateway takes in an adapter another one uploads, and drops it when that one deletes it', async () => {
    const [, dir] = await writeTestAdapters(fixtures.dir, 2);
    const a = await startGateway(nats.url);
    const b = await startGateway(nats.url);
    try {
      const created = await api(a, 'POST', '/v1/keys', a.adminKey, { tenant: 'carol' });
      assert.equal(created.status, 201);
      const carol = created.json.key as string;
      const contentHash = (((await api(a, 'GET', '/v1/models', carol)).json.models as Record<string, unknown>[])[0]).contentHash as string;
      const listed = async (node: typeof a): Promise<string[]> => ((await api(node, 'GET', '/v1/adapters', carol)).json.adapters as { name: string }[]).map((x) => x.name);
      assert.deepEqual(await listed(b), []);
      const up = await api(a, 'POST', '/v1/adapters', carol, {
        name: 'live', baseContentHash: contentHash,
        adapter: { config: await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8'), weights: (await readFile(join(dir, ADAPTER_WEIGHTS_FILE))).toString('base64') },
      });
      assert.equal(up.status, 201, JSON.stringify(up.json));
      await until(async () => (await listed(b)).includes('live'), 10_000, 'the other gateway took the adapter in');
      assert.ok((await readFile(join(b.stateDir, 'serving', 'adapters', 'carol', 'live', ADAPTER_WEIGHTS_FILE))).equals(await readFile(join(dir, ADAPTER_WEIGHTS_FILE))));
      assert.equal((await api(b, 'DELETE', '/v1/adapters/live', carol)).status, 200);
      await until(async () => !(await listed(a)).includes('live'), 10_000, 'the first gateway dropped it');
    } finally {
      await a.remove();
      await b.remove();
    }
  });
  it('a mirror that closes waits for its calls in flight and refuses later ones, so that no JetStream consumer outlives the drain', async () => {
    const nc = await connectNats(nats.url, 'test-mirror-close', 'gateway');
    const dir = await tempDir('mirror-close');
    try {
      const mirror = await JetStreamFileMirror.open(nc, dir.dir);
      let settled = false;
      const inFlight = mirror.restore('serving/adapters').finally(() => { settled = true; });
      await mirror.close();
      assert.ok(settled, 'the restore in flight finished before close() resolved');
      await inFlight;
      await assert.rejects(mirror.names('serving/adapters'), { code: 'TANDEM_NODE_CLOSING' });
      await assert.rejects(mirror.restore('emulators'), { code: 'TANDEM_NODE_CLOSING' });
    } finally {
      await nc.drain();
      await dir.remove();
    }
  });
});
