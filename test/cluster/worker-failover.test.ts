// A worker process killed with SIGKILL while training runs: the gateway sends its requests to
// the other worker of the range (no answer, or no responders) and recomputes the backwards
// whose tapes died with it, and the run ends with the adapter of an uninterrupted run.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { initBackend } from '../../model/index.ts';
import { trainReference } from '../edge-client/helpers.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { LORA, RUN, maxAdapterDiff, spawnWorker, startGateway, stopChild, trainThrough, until } from './helpers.ts';

describe('a worker killed mid-training', () => {
  let nats: TestNatsServer;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
  });
  after(() => nats.close());

  it('kill -9 of one of two worker processes: training finishes with the adapter of an uninterrupted run', async () => {
    const workers = [await spawnWorker(nats.url), await spawnWorker(nats.url)];
    const gateway = await startGateway(nats.url);
    try {
      await until(async () => (await gateway.cluster?.status.workers())?.length === 2, 15_000, 'both workers announced');
      let killedAt = 0;
      const run = await trainThrough(gateway.url, gateway.adminKey as string, {
        onEvent: (e) => {
          if (e.type !== 'step' || killedAt !== 0) return;
          killedAt = e.step;
          // The next step's forward is on its way when the worker dies.
          setImmediate(() => workers[0].kill('SIGKILL'));
        },
      });
      assert.equal(killedAt, 1);
      assert.equal(workers[0].signalCode ?? (await new Promise((r) => workers[0].once('exit', (_c, s) => r(s)))), 'SIGKILL');
      const reference = await trainReference({ methods: LORA, ...RUN });
      assert.equal(run.losses.length, RUN.steps, 'no step lost');
      run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - reference.losses[i]) <= 1e-5, `step ${i + 1}: ${loss} vs ${reference.losses[i]}`));
      const diff = maxAdapterDiff(reference.adapter, run.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
      await until(async () => (await gateway.cluster?.status.workers())?.length === 1, 10_000, 'the dead worker is forgotten');
    } finally {
      await gateway.remove();
      for (const w of workers) await stopChild(w);
    }
  });
});
