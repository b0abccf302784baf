// A gateway spreads concurrent requests over the workers of a range by its own requests in
// flight (a queue group alone picks at random: 4 on 2 workers land 3 and 1 more often than
// not): 4 concurrent forwards on 2 idle workers go 2 and 2, round after round.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ClusterExecutor } from '../../cloud-node/index.ts';
import type { MiddleWorkerNode } from '../../cloud-node/index.ts';
import type { KeptTape } from '../../cloud-node/middle-runner.ts';
import { Rng, initBackend } from '../../model/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { startWorker } from './helpers.ts';

describe('the gateway\'s choice of worker', () => {
  let nats: TestNatsServer;
  let workers: MiddleWorkerNode[];
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    workers = [await startWorker(nats.url), await startWorker(nats.url)];
  });
  after(async () => {
    for (const w of workers) await w.close();
    await nats.close();
  });

  it('4 concurrent forwards on 2 workers of one range go 2 and 2', async () => {
    const executor = await ClusterExecutor.connect({ natsUrl: nats.url, contentHash: workers[0].contentHash });
    try {
      while (executor.workers < 2) await executor.directory.changed(1000);
      const shape: [number, number, number] = [1, 8, 64];
      const rng = new Rng(1);
      const h = (): Float32Array => Float32Array.from({ length: 8 * 64 }, () => rng.normal());
      for (let round = 0; round < 3; round++) {
        const kept = await Promise.all([0, 1, 2, 3].map(() => executor.forwardKeepingTape({ start: 1, end: 4 }, h(), shape)));
        const by = (kept.map((k) => (k.tape as KeptTape & { links: { worker: string }[] }).links[0].worker));
        const counts = workers.map((w) => by.filter((id) => id === w.id).length);
        assert.deepEqual(counts, [2, 2], `round ${round + 1}: forwards per worker ${counts.join(', ')}`);
        await Promise.all(kept.map((k) => executor.backwardFromTape(k.tape, h(), shape)));
        assert.equal(executor.restarts, 0, 'no request was sent again');
      }
    } finally {
      await executor.close();
    }
  });
});
