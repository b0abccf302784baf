// A request whose body is over max_payload keeps one object in the spill bucket for all its
// tries, however many times no worker answers, and the object is gone once the request ends; a
// tenant's bodies in the bucket at once are bounded, so one tenant cannot fill the server's
// memory store for the others (nats-server with max_payload 16 KiB, a worker announced but gone);
// a worker stores no reply for a gateway that has stopped waiting.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Objm } from '@nats-io/obj';
import { headers as natsHeaders, nuid } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { ClusterExecutor } from '../../cloud-node/index.ts';
import { CloudError } from '../../cloud-node/errors.ts';
import type { BlockRange, Shape3 } from '../../cloud-node/middle-runner.ts';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { SPILL_BUCKET, WireSpill } from '../../cloud-node/cluster/wire-spill.ts';
import { ANNOUNCE_SUBJECT, WAIT_HEADER, decodeReply, encodeRequest, workerSubject } from '../../cloud-node/cluster/wire.ts';
import { Rng, initBackend } from '../../model/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { startWorker, until } from './helpers.ts';

const MAX_PAYLOAD = 16 * 1024;
/** 2 x 64 x 64 float32: a 32 KiB body, over max_payload. */
const SHAPE: Shape3 = [2, 64, 64];

describe('spilled request bodies across tries (nats-server with max_payload 16 KiB)', () => {
  let nats: TestNatsServer;
  let nc: NatsConnection;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer({ maxPayload: MAX_PAYLOAD });
    nc = await connectNats(nats.url, 'test-spill-retries', 'gateway');
  });
  after(async () => {
    await nc.close();
    await nats.close();
  });

  it('a body is stored once for all tries and deleted when its request ends; a tenant over its share is refused, others are not', async () => {
    // The model's content hash and range, from a worker that then leaves.
    const probe = await startWorker(nats.url);
    const { contentHash } = probe;
    const range: BlockRange = { ...probe.blocks };
    await probe.close();

    const rng = new Rng(5);
    const h = (): Float32Array => Float32Array.from({ length: SHAPE[0] * SHAPE[1] * SHAPE[2] }, () => rng.normal());
    // Room for three of mallory's bodies (32 KiB and a little framing each), not four.
    const executor = await ClusterExecutor.connect({ natsUrl: nats.url, contentHash, spillBytesPerTenant: 3 * 32 * 1024 + 4096 }, nc);
    // The bucket is made by the first body over max_payload.
    const objects = async (): Promise<number> => (await (await new Objm(nc).open(SPILL_BUCKET)).list()).length;
    let worker: Awaited<ReturnType<typeof startWorker>> | undefined;
    try {
      // A worker of the range that is announced but gone (killed): every try finds no responders.
      nc.publish(ANNOUNCE_SUBJECT, JSON.stringify({ id: 'gone', model: 'm', contentHash, blocks: range, load: { queued: 0, running: 0, tokensPerSecond: 0 } }));
      await until(() => executor.workers === 1, 20_000, 'the gone worker was announced');

      const mallory = [0, 1, 2].map(() => executor.forward(range, h(), SHAPE, 'mallory'));
      const bob = executor.forward(range, h(), SHAPE, 'bob');
      for (const p of [...mallory, bob]) p.catch(() => undefined);
      await until(() => executor.restarts >= 12, 20_000, 'the requests were tried again');
      assert.equal(await objects(), 4, 'one object per request in flight, not one per try');
      await assert.rejects(executor.forward(range, h(), SHAPE, 'mallory'), (e: CloudError) => e instanceof CloudError && e.code === 'TANDEM_QUOTA_EXCEEDED' && /mallory/.test(e.message), 'mallory\'s fourth body is over her share');

      // A worker of the range comes up: the requests in flight are answered, and their bodies go.
      worker = await startWorker(nats.url);
      const outputs = await Promise.all([...mallory, bob]);
      outputs.forEach((o) => assert.equal(o.length, SHAPE[0] * SHAPE[1] * SHAPE[2]));
      await until(async () => (await objects()) === 0, 20_000, `the bucket ${SPILL_BUCKET} holds none of the ended requests' bodies`);

      // Another tenant's large request then crosses, and leaves nothing behind either.
      const carol = await executor.forward(range, h(), SHAPE, 'carol');
      assert.equal(carol.length, SHAPE[0] * SHAPE[1] * SHAPE[2]);
      assert.ok(executor.hop.spilled >= 5, `the bodies went through the object store (${executor.hop.spilled})`);
      await until(async () => (await objects()) === 0, 20_000, 'carol\'s body was deleted');
    } finally {
      await executor.close();
      await worker?.close();
    }
  });

  it('a worker does not store a reply its gateway has stopped waiting for', async () => {
    const worker = await startWorker(nats.url);
    const spill = new WireSpill(nc);
    const rng = new Rng(9);
    const body = (): Uint8Array => encodeRequest({ op: 'forward', blocks: { ...worker.blocks }, shape: SHAPE, h: Float32Array.from({ length: SHAPE[0] * SHAPE[1] * SHAPE[2] }, () => rng.normal()), keepTape: false });
    const objects = async (): Promise<number> => (await (await new Objm(nc).open(SPILL_BUCKET)).list()).length;
    try {
      // Its gateway waits 1 ms: by the time the 32 KiB reply is ready nobody listens on its inbox.
      const late = natsHeaders();
      late.set(WAIT_HEADER, '1');
      const abandoned = await spill.outgoing(body(), late);
      nc.publish(workerSubject(worker.id), abandoned.data, { reply: `_INBOX.${nuid.next()}`, headers: abandoned.headers });
      // A second request of the same tenant, answered after the first (one compute thread, in order).
      const live = await spill.outgoing(body());
      const reply = decodeReply(await spill.incoming(await nc.request(workerSubject(worker.id), live.data, { headers: live.headers, timeout: 20_000 }), 1 << 20), SHAPE[0] * SHAPE[1] * SHAPE[2]);
      assert.equal(reply.ok, true);
      await until(async () => (await objects()) === 0, 20_000, 'the spill bucket to hold nothing');
      assert.equal(await objects(), 0, 'no reply was left for a gateway that stopped waiting');
    } finally {
      await worker.close();
    }
  });
});
