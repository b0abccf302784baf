// Bodies over max_payload through the object store, checked as network input: a body within the
// limit crosses whole; a receiver refuses, before reading it, an object larger than it accepts,
// and a header that names no object or not a plain name. A gateway warns when the server's
// max_payload is under what infra/nats deploys.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { headers } from '@nats-io/transport-node';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { Objm } from '@nats-io/obj';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { ClusterExecutor } from '../../cloud-node/cluster/cluster-executor.ts';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import type { Msg, NatsConnection } from '@nats-io/transport-node';
import { RECOMMENDED_MAX_PAYLOAD, SPILL_BUCKET, WireSpill, SPILL_HEADER } from '../../cloud-node/cluster/wire-spill.ts';
import type { ClusterError } from '../../cloud-node/cluster/errors.ts';
import { CloudError } from '../../cloud-node/errors.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';

describe('bodies over max_payload (nats-server with max_payload 8 KiB)', () => {
  let nats: TestNatsServer;
  let nc: NatsConnection;
  before(async () => {
    nats = await startNatsServer({ maxPayload: 8192 });
    nc = await connectNats(nats.url, 'test-spill', 'gateway');
  });
  after(async () => {
    await nc.close();
    await nats.close();
  });

  /** What a subscriber receives for `data` and `h`. */
  const received = async (data: Uint8Array, h = headers()): Promise<Msg> => {
    const subject = `spill.test.${Math.random().toString(36).slice(2)}`;
    const sub = nc.subscribe(subject, { max: 1 });
    nc.publish(subject, data, { headers: h });
    for await (const msg of sub) return msg;
    throw new Error('no message');
  };

  it('a 100 KB body crosses whole, once; a small one stays inline', async () => {
    const spill = new WireSpill(nc);
    const body = Uint8Array.from({ length: 100_000 }, (_, i) => (i * 7) % 251);
    const out = await spill.outgoing(body);
    assert.equal(out.data.byteLength, 0, 'the message carries no body');
    const msg = await received(out.data, out.headers);
    assert.deepEqual(await spill.incoming(msg, 200_000), body);
    await assert.rejects(spill.incoming(msg, 200_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID', 'the object was deleted once read');
    const small = await spill.outgoing(Uint8Array.of(1, 2, 3));
    assert.deepEqual(small.data, Uint8Array.of(1, 2, 3));
    assert.equal(small.headers.has(SPILL_HEADER), false);
    assert.equal(spill.stats.spilled, 1);
  });

  it('refuses an object over the receiver\'s limit, and a header naming no plain object', async () => {
    const spill = new WireSpill(nc);
    const out = await spill.outgoing(new Uint8Array(50_000));
    await assert.rejects(spill.incoming(await received(out.data, out.headers), 10_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_BODY_TOO_LARGE' && /50000 bytes/.test(e.message));
    for (const name of ['../etc/passwd', 'nosuchobject123']) {
      const h = headers();
      h.set(SPILL_HEADER, name);
      await assert.rejects(spill.incoming(await received(new Uint8Array(0), h), 10_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID', name);
    }
  });

  it('a record written with the worker password that lies about its size, or links to another bucket, is refused without reading past it (found by fuzzing)', async () => {
    const spill = new WireSpill(nc);
    assert.equal(await spill.prepare(), true, 'the gateway creates the bucket');
    const files = await new Objm(nc).create('tandem-test-files');
    await files.putBlob({ name: 'secret' }, new Uint8Array(30_000).fill(7));
    const worker = await connectNats(nats.url, 'test-spill-worker', 'worker');
    try {
      const wire = await new Objm(worker).create(SPILL_BUCKET);
      await wire.putBlob({ name: 'big', options: { max_chunk_size: 4096 } }, new Uint8Array(400_000).fill(1));
      const big = (await wire.info('big'))!;
      const forge = async (name: string, extra: Record<string, unknown>): Promise<Msg> => {
        const h = headers();
        h.set('Nats-Rollup', 'sub');
        const meta = { name, bucket: SPILL_BUCKET, nuid: big.nuid, size: 16, chunks: 1, digest: big.digest, mtime: new Date().toISOString(), options: { max_chunk_size: 4096 }, ...extra };
        // The object store names a record's subject by the name in padded base64url.
        const subject = Buffer.from(name).toString('base64url').padEnd(Math.ceil(name.length / 3) * 4, '=');
        await jetstream(worker).publish(`$O.${SPILL_BUCKET}.M.${subject}`, JSON.stringify(meta), { headers: h });
        const m = headers();
        m.set(SPILL_HEADER, name);
        return received(new Uint8Array(0), m);
      };
      await assert.rejects(spill.incoming(await forge('liar', {}), 10_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID' && /holds more than the 16 bytes its record states/.test(e.message));
      await assert.rejects(spill.incoming(await forge('link', { options: { link: { bucket: 'tandem-test-files', name: 'secret' } } }), 100_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID' && /is a link/.test(e.message));
      await assert.rejects(spill.incoming(await forge('made', { options: { link: { bucket: 'made-by-a-worker', name: 'x' } } }), 100_000), (e: ClusterError) => /is a link/.test(e.message));
      // A record whose chunks never come: the read ends at its deadline, not never.
      const slow = new WireSpill(nc, { readTimeoutMs: 500 });
      await assert.rejects(slow.incoming(await forge('stall', { nuid: 'nochunksatall', size: 1000 }), 10_000), (e: ClusterError) => e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID' && /not read whole within 500 ms \(0 of 1000 bytes\)/.test(e.message));
      const streams = await (await jetstreamManager(nc)).streams.names().next();
      assert.ok(!streams.includes('OBJ_made-by-a-worker'), `no bucket was created: ${streams.join(', ')}`);
    } finally {
      await worker.close();
    }
  });

  it('a worker may use the bucket but not create, update or delete its stream: a stream config could republish into the key bucket (found by fuzzing)', async () => {
    const spill = new WireSpill(nc);
    await spill.prepare();
    const worker = await connectNats(nats.url, 'test-spill-worker-2', 'worker');
    worker.closed().catch(() => undefined);
    try {
      const jsm = await jetstreamManager(worker);
      const stream = `OBJ_${SPILL_BUCKET}`;
      const config = (await jsm.streams.info(stream)).config;
      await assert.rejects(jsm.streams.update(stream, { ...config, republish: { src: `$O.${SPILL_BUCKET}.C.evil`, dest: '$KV.tandem-keys.forged' } }), /permission|timeout|no responders|503/i);
      await assert.rejects(jsm.streams.delete(stream), /permission|timeout|no responders|503/i);
      await assert.rejects(jsm.streams.add({ name: 'OBJ_by-a-worker', subjects: ['$O.by-a-worker.>'] }), /permission|timeout|no responders|503/i);
      // What a worker's replies need still works: a body stored, read back and deleted.
      const own = new WireSpill(worker);
      const out = await own.outgoing(new Uint8Array(50_000).fill(3));
      assert.deepEqual(await spill.incoming(await received(out.data, out.headers), 60_000), new Uint8Array(50_000).fill(3));
    } finally {
      await worker.close();
    }
  });

  it('a store full for now is 503 TANDEM_STORE_FULL (the edge retries it), and takes bodies again once others are deleted', async () => {
    const small = await startNatsServer({ maxPayload: 8192, maxMemoryStore: '1MB' });
    const snc = await connectNats(small.url, 'test-spill-full', 'gateway');
    try {
      const spill = new WireSpill(snc);
      const first = await spill.hold(new Uint8Array(600_000));
      await assert.rejects(spill.hold(new Uint8Array(600_000)), (e: CloudError) => e instanceof CloudError && e.code === 'TANDEM_STORE_FULL' && e.status === 503 && /600000 bytes/.test(e.message), 'the second body does not fit');
      await first.release();
      const again = await spill.hold(new Uint8Array(600_000));
      await again.release();
      // Larger than the whole store: waiting frees nothing, so it is not retried.
      await assert.rejects(spill.hold(new Uint8Array(1_500_000)), (e: CloudError) => e instanceof CloudError && e.code === 'TANDEM_RESOURCE_EXHAUSTED' && e.status === 400 && /1500000 bytes/.test(e.message), 'a body the empty store cannot hold');
      const held = await spill.hold(new Uint8Array(600_000));
      await assert.rejects(spill.hold(new Uint8Array(1_500_000)), (e: CloudError) => e.code === 'TANDEM_STORE_FULL', 'while another body is held, the store may yet free enough');
      await held.release();
    } finally {
      await snc.close();
      await small.close();
    }
  });

  it('a gateway on a server whose max_payload is under 8MB says so, and on one at 8MB does not', async () => {
    const warnings = async (url: string): Promise<string[]> => {
      const lines: string[] = [];
      const log = pino({ level: 'warn' }, new Writable({ write(chunk: Buffer, _e, done) { lines.push(chunk.toString()); done(); } }));
      const executor = await ClusterExecutor.connect({ natsUrl: url, contentHash: 'sha256:00', log });
      await executor.close();
      return lines.map((l) => (JSON.parse(l) as { msg: string }).msg);
    };
    const small = await warnings(nats.url);
    assert.equal(small.length, 1, small.join('\n'));
    assert.match(small[0], /max_payload is 8192 bytes: activations over it go through the JetStream object store.*max_payload: 8388608/);
    const deployed = await startNatsServer({ maxPayload: RECOMMENDED_MAX_PAYLOAD });
    try {
      assert.deepEqual(await warnings(deployed.url), []);
    } finally {
      await deployed.close();
    }
  });
});
