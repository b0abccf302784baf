// Activation tensors larger than the NATS server's max_payload still cross: with max_payload at
// 16 KiB, every forward (h: 4 × 32 × 64 float32 = 32 KiB) and backward goes through the
// JetStream object store in chunks, and split training still equals one process, also after
// a nats-server restart (the in-memory spill bucket is made again). With that store full for a
// while, the gateway answers TANDEM_STORE_FULL and the edge's retries finish the same run; a
// body larger than the whole store is refused for good, at once.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { WireSpill } from '../../cloud-node/cluster/wire-spill.ts';
import { initBackend } from '../../model/index.ts';
import { metric } from '../cloud-node/helpers.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { RUN, maxAdapterDiff, startGateway, startWorker, trainOnOneProcess, trainThrough, until } from './helpers.ts';

const MAX_PAYLOAD = 16 * 1024;

describe('cluster messages over max_payload (nats-server with max_payload 16 KiB)', () => {
  let nats: TestNatsServer;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer({ maxPayload: MAX_PAYLOAD });
  });
  after(() => nats.close());

  it('a step whose tensors exceed max_payload crosses through the object store and trains as one process does', async () => {
    assert.ok(RUN.batchSize * RUN.seqLen * 64 * 4 > MAX_PAYLOAD, 'the recipe\'s activations are larger than max_payload');
    const single = await trainOnOneProcess();

    const worker = await startWorker(nats.url);
    const gateway = await startGateway(nats.url);
    try {
      await until(async () => (await gateway.cluster?.status.workers())?.length === 1, 10_000, 'the worker announced');
      const run = await trainThrough(gateway.url, gateway.adminKey as string);
      assert.equal(run.losses.length, single.losses.length);
      run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - single.losses[i]) <= 1e-5, `step ${i + 1}: cluster ${loss} vs one process ${single.losses[i]}`));
      const diff = maxAdapterDiff(single.adapter, run.adapter);
      assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
      const hop = gateway.cluster?.hop();
      assert.ok(hop !== undefined && hop.requests >= RUN.steps * 2, 'the middle ran on the worker');
      assert.ok(hop.spilled >= RUN.steps * 2, `every forward and backward went through the object store (${hop.spilled} of ${hop.requests})`);

      // The spill bucket is in memory: a restarted nats-server has none, and it is made again;
      // the session's first write, sent while the gateway reconnects, is sent again.
      await nats.stop();
      await nats.start();
      const again = await trainThrough(gateway.url, gateway.adminKey as string);
      again.losses.forEach((loss, i) => assert.ok(Math.abs(loss - single.losses[i]) <= 1e-5, `after the restart, step ${i + 1}: ${loss} vs ${single.losses[i]}`));
      assert.ok((gateway.cluster?.hop().spilled ?? 0) > hop.spilled, 'and went through the object store again');
    } finally {
      await gateway.remove();
      await worker.close();
    }
  });

  it('with the object store full for a while, the edge is answered 503 TANDEM_STORE_FULL, retries, and trains as one process does', async () => {
    const single = await trainOnOneProcess();
    const small = await startNatsServer({ maxPayload: MAX_PAYLOAD, maxMemoryStore: '1MB' });
    const nc = await connectNats(small.url, 'test-filler', 'gateway');
    const worker = await startWorker(small.url);
    const gateway = await startGateway(small.url);
    try {
      await until(async () => (await gateway.cluster?.status.workers())?.length === 1, 10_000, 'the worker announced');
      // Another party's body fills the store: a 32 KiB forward no longer fits.
      const filler = await new WireSpill(nc).hold(new Uint8Array(1_020_000));
      const full = (): Promise<number> => metric(gateway, 'tandem_errors_total{code="TANDEM_STORE_FULL"}');
      const training = trainThrough(gateway.url, gateway.adminKey as string);
      await until(async () => (await full()) >= 1, 20_000, 'a request refused for the full store');
      await filler.release();
      const run = await training;
      run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - single.losses[i]) <= 1e-5, `step ${i + 1}: ${loss} vs one process ${single.losses[i]}`));
      assert.ok(maxAdapterDiff(single.adapter, run.adapter) <= 1e-5);
    } finally {
      await gateway.remove();
      await worker.close();
      await nc.close();
      await small.close();
    }
  });

  it('a body larger than the whole object store is refused once with 400 TANDEM_RESOURCE_EXHAUSTED, not retried', async () => {
    // 24 KiB of JetStream memory: less than one 32 KiB forward, with nothing else held.
    const tiny = await startNatsServer({ maxPayload: MAX_PAYLOAD, maxMemoryStore: '24KB' });
    const worker = await startWorker(tiny.url);
    const gateway = await startGateway(tiny.url);
    try {
      await until(async () => (await gateway.cluster?.status.workers())?.length === 1, 10_000, 'the worker announced');
      await assert.rejects(trainThrough(gateway.url, gateway.adminKey as string), (e: Error & { code?: string }) => /TANDEM_RESOURCE_EXHAUSTED/.test(`${e.code} ${e.message}`) && /does not fit even with the store holding no other body/.test(e.message));
      assert.equal(await metric(gateway, 'tandem_errors_total{code="TANDEM_RESOURCE_EXHAUSTED"}'), 1, 'refused once: the edge did not send it again');
      assert.equal(await metric(gateway, 'tandem_errors_total{code="TANDEM_STORE_FULL"}'), 0);
    } finally {
      await gateway.remove();
      await worker.close();
      await tiny.close();
    }
  });
});
