// `tandem cluster up` in code: a nats-server on loopback with the users of auth.conf and
// passwords made for the launch, a worker and a gateway that answer, and all of it stopped.
import assert from 'node:assert/strict';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { launchCluster } from '../../cloud-node/cluster/launcher.ts';
import { NATS_SERVER, freePort } from './nats-server.ts';
import { BIN, FIXTURE, tempDir } from './helpers.ts';

describe('tandem cluster up', () => {
  it('starts nats-server (loopback, passwords), a worker and a gateway that is ready; stop() ends every process', async () => {
    const state = await tempDir('cluster-up');
    const [natsPort, gatewayPort] = [await freePort(), await freePort()];
    const cluster = await launchCluster({ modelDir: FIXTURE, workers: 1, ranges: [], stateDir: state.dir, natsPort, gatewayPort, bin: BIN, backend: 'wasm', natsServer: NATS_SERVER });
    try {
      assert.equal(cluster.natsUrl, `nats://127.0.0.1:${natsPort}`);
      assert.ok(cluster.adminKey, 'the gateway printed the admin key it created');
      const conf = join(state.dir, 'nats.conf');
      assert.equal((await stat(conf)).mode & 0o777, 0o600);
      assert.match(await readFile(conf, 'utf8'), /^include ".*auth\.conf"$/m);
      // No one gets on this NATS without the launch's passwords.
      await assert.rejects(connect({ servers: cluster.natsUrl, maxReconnectAttempts: 0 }), /authorization/i);
      let ready = 0;
      for (let i = 0; i < 100 && ready !== 200; i++) {
        ready = (await fetch(`${cluster.gatewayUrl}/v1/ready`)).status;
        if (ready !== 200) await new Promise((r) => setTimeout(r, 200));
      }
      assert.equal(ready, 200, 'the gateway is ready');
      const status = await fetch(`${cluster.gatewayUrl}/v1/cluster`, { headers: { authorization: `Bearer ${cluster.adminKey}` } });
      const body = (await status.json()) as { workers?: unknown[] };
      assert.equal(status.status, 200);
      assert.equal(body.workers?.length, 1, 'the worker announced itself through NATS as tandem-worker');
    } finally {
      await cluster.stop();
    }
    await assert.rejects(fetch(`${cluster.gatewayUrl}/v1/ready`), 'the gateway is gone');
    await assert.rejects(connect({ servers: cluster.natsUrl, maxReconnectAttempts: 0 }), 'nats-server is gone');
    await state.remove();
  });

  it('a nats-server that is not there is a typed error that says how to install it, and nothing is left running', async () => {
    const state = await tempDir('cluster-up-missing');
    const missing = join(state.dir, 'no-such-nats-server');
    await assert.rejects(
      launchCluster({ modelDir: FIXTURE, workers: 1, ranges: [], stateDir: state.dir, natsPort: await freePort(), gatewayPort: await freePort(), bin: BIN, backend: 'wasm', natsServer: missing }),
      (err: Error & { code?: string }) => err.code === 'TANDEM_CLUSTER_START_FAILED' && err.message.includes(missing) && /apt-get install -y nats-server/.test(err.message),
    );
    await state.remove();
  });
});
