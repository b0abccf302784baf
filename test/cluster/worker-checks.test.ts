// A worker checks every request against its model before anything computes: a forward whose
// hidden size is not the model's, one longer than the context, and a backward whose g does
// not have its tape's shape are each answered `invalid` with the field, and the worker goes
// on serving (a poison request does not crash it or cost other tenants their tapes).
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { decodeReply, encodeRequest, rangeSubject, workerSubject } from '../../cloud-node/cluster/wire.ts';
import type { MiddleRequest } from '../../cloud-node/cluster/wire.ts';
import type { MiddleWorkerNode } from '../../cloud-node/index.ts';
import { initBackend } from '../../model/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { startWorker } from './helpers.ts';

describe('a worker checks requests against its model', () => {
  let nats: TestNatsServer;
  let worker: MiddleWorkerNode;
  before(async () => {
    await initBackend({ backend: 'cpu' });
    nats = await startNatsServer();
    worker = await startWorker(nats.url);
  });
  after(async () => {
    await worker?.close();
    await nats?.close();
  });

  it('a wrong hidden size, a sequence over the context and a g unlike its tape are refused; the worker still serves', async () => {
    const nc = await connectNats(nats.url, 'test-gateway', 'gateway');
    const ask = async (subject: string, request: MiddleRequest, elements: number) => decodeReply((await nc.request(subject, encodeRequest(request), { timeout: 20_000 })).data, elements);
    const range = rangeSubject(worker.contentHash, worker.blocks);
    const blocks = { start: 1, end: 4 };
    try {
      const wrongHidden = await ask(range, { op: 'forward', blocks, shape: [1, 8, 7], h: new Float32Array(56), keepTape: false }, 56);
      assert.equal(wrongHidden.ok, false);
      assert.match(wrongHidden.ok ? '' : wrongHidden.message, /hidden size 7 is not the model's 64/);
      const long = await ask(range, { op: 'forward', blocks, shape: [1, 600, 64], h: new Float32Array(600 * 64), keepTape: false }, 600 * 64);
      assert.match(long.ok ? '' : long.message, /over the model's context of 512/);
      const kept = await ask(range, { op: 'forward', blocks, shape: [1, 8, 64], h: new Float32Array(8 * 64).fill(0.1), keepTape: true }, 8 * 64);
      assert.ok(kept.ok && kept.tapeId !== undefined, 'a good forward keeps its tape');
      const tapeId = (kept as { tapeId: number }).tapeId;
      const unlike = await ask(workerSubject(worker.id), { op: 'backwardFromTape', tapeId, shape: [2, 4, 64], g: new Float32Array(8 * 64) }, 8 * 64);
      assert.equal(unlike.ok, false);
      assert.match(unlike.ok ? '' : unlike.message, /is not the shape of tape/);
      const good = await ask(range, { op: 'forward', blocks, shape: [1, 8, 64], h: new Float32Array(8 * 64).fill(0.1), keepTape: false }, 8 * 64);
      assert.ok(good.ok, 'the worker still serves');
    } finally {
      await nc.drain();
    }
  });
});
