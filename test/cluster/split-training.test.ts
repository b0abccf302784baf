// Split training through a gateway and NATS workers computes what one process computes:
// the same losses and the same adapter (f32 codecs), with two workers of one range and with
// a two-range pipeline.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { initBackend } from '../../model/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { maxAdapterDiff, onCluster, trainOnOneProcess, trainThrough } from './helpers.ts';

describe('split training through a NATS cluster (stories260K, cut (1, 1): middle blocks [1, 4))', () => {
  let nats: TestNatsServer;
  let single: { losses: number[]; adapter: Map<string, Float32Array> };
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    single = await trainOnOneProcess();
  });
  after(() => nats.close());

  type Run = { losses: number[]; adapter: Map<string, Float32Array> };
  const same = (run: Run, want: Run = single): void => {
    assert.equal(run.losses.length, want.losses.length);
    run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - want.losses[i]) <= 1e-5, `step ${i + 1}: cluster ${loss} vs one process ${want.losses[i]}`));
    const diff = maxAdapterDiff(want.adapter, run.adapter);
    assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
  };

  it('a gateway and two workers of the whole model train as one process does, and both workers compute', async () => {
    await onCluster(nats.url, [undefined, undefined], async (gateway, workers) => {
      const cluster = gateway.cluster;
      assert.ok(cluster !== undefined, 'a gateway reports its cluster');
      const listed = await cluster.status.workers();
      assert.deepEqual(listed.map((w) => w.blocks).sort((a, b) => a.start - b.start), [{ start: 0, end: 5 }, { start: 0, end: 5 }]);
      assert.deepEqual(new Set(listed.map((w) => w.id)), new Set(workers.map((w) => w.id)));
      same(await trainThrough(gateway.url, gateway.adminKey as string));
      assert.ok(cluster.hop().requests >= 4 * 2, `the middle ran on the workers (${cluster.hop().requests} requests)`);
      assert.equal(gateway.compute.backend, 'nats');
    });
  });

  it('a two-range pipeline (blocks 1-2 and 2-4, one worker each) trains as one worker does', async () => {
    await onCluster(nats.url, ['1-2', '2-4'], async (gateway) => {
      same(await trainThrough(gateway.url, gateway.adminKey as string));
      const owned = (await gateway.cluster?.status.workers())?.map((w) => `${w.blocks.start}-${w.blocks.end}`).sort();
      assert.deepEqual(owned, ['1-2', '2-4']);
    });
  });

  it('with an int8-block forward and an f16 backward, the gateway sends the edge frames as they came and trains as one process does', async () => {
    const lossy = { codecForward: 'int8-block', codecBackward: 'f16' } as const;
    const one = await trainOnOneProcess(lossy);
    await onCluster(nats.url, [undefined], async (gateway) => {
      const hop = () => gateway.cluster?.hop() ?? { requests: 0, requestBytes: 0 };
      same(await trainThrough(gateway.url, gateway.adminKey as string, lossy), one);
      const framed = hop();
      same(await trainThrough(gateway.url, gateway.adminKey as string));
      const plain = { requests: hop().requests - framed.requests, requestBytes: hop().requestBytes - framed.requestBytes };
      // h_B at a quarter and g_M at half of their float32 bytes (forwards and backwards alike).
      const ratio = (framed.requestBytes / framed.requests) / (plain.requestBytes / plain.requests);
      assert.ok(ratio < 0.6, `a lossy request body is ${ratio.toFixed(2)} of a float32 one`);
    });
  });
});
