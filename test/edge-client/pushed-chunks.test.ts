// A hostile cloud (here a man-in-the-middle in front of a real node) pushes chunk streams that
// no request of the edge opened, and one on the reply stream of a request in flight that it
// never finishes. The edge refuses the first, drops the second when its request ends, holds
// none of their bytes, and its own chunked replies still reassemble.
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Server } from 'socket.io';
import type { Socket as ServerSocket } from 'socket.io';
import { io as ioClient } from 'socket.io-client';
import { connectCloud } from '../../edge-client/index.ts';
import type { CloudClient } from '../../edge-client/index.ts';
import { crc32, decodeEnvelope, encodeEnvelope, envelope, replyStreamId } from '../../protocol/index.ts';
import type { ModelDescription } from '../../protocol/index.ts';
import { api, createTenantKey, frameOf, randomTensor, startTestNode } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';
import { MODEL_ID } from './helpers.ts';

/** The smallest message limit a node may state: a 50 KB reply goes as more chunks than one ack carries. */
const LIMITS = { maxMessageBytes: 4096, maxFrameBytes: 64 * 1024 };
const STREAMS = 16;
const PUSHED_BYTES = 256 * 1024;

/** Chunk 0 of 2 of a stream declaring 32 MB: what pins the edge's memory if it is held. */
function pushedChunk(streamId: string): Uint8Array {
  const data = new Uint8Array(PUSHED_BYTES).fill(7);
  return encodeEnvelope(envelope(streamId, { case: 'chunk', value: { streamId, index: 0, count: 2, totalBytes: 32 << 20, crc32: crc32(data), data } }));
}

interface Mitm {
  url: string;
  /** Chunks of real replies the node pushed and the proxy passed on. */
  replyPushes: number;
  close(): Promise<void>;
}

/**
 * Forwards the data plane to `upstream`. It pushes STREAMS unasked streams as soon as the edge
 * connects (no request in flight), one on the reply stream of the first request (the Hello) while
 * that is in flight, and STREAMS more when the first chunk of a chunked request arrives.
 */
async function startMitm(upstream: string): Promise<Mitm> {
  const http = createServer();
  const io = new Server(http, { transports: ['websocket'], maxHttpBufferSize: 1e8, perMessageDeflate: false, serveClient: false });
  const mitm: Mitm = { url: '', replyPushes: 0, close: async () => undefined };
  io.on('connection', (edge: ServerSocket) => {
    const cloud = ioClient(upstream, { transports: ['websocket'], auth: edge.handshake.auth, reconnection: false, forceNew: true });
    cloud.on('envelope', (b: unknown) => {
      mitm.replyPushes += 1;
      edge.emit('envelope', b);
    });
    for (let i = 0; i < STREAMS; i++) edge.emit('envelope', pushedChunk(`unasked-${i}`));
    let first = true;
    let chunkedSeen = false;
    edge.on('envelope', async (bytes: Uint8Array, ack: (x: unknown) => void) => {
      const request = decodeEnvelope(new Uint8Array(bytes), { maxMessageBytes: 1e8 });
      if (first) edge.emit('envelope', pushedChunk(replyStreamId(request.requestId)));
      first = false;
      if (request.body.case === 'chunk' && !chunkedSeen) {
        chunkedSeen = true;
        for (let i = 0; i < STREAMS; i++) edge.emit('envelope', pushedChunk(`unasked-late-${i}`));
      }
      if (!cloud.connected) await new Promise<void>((r) => cloud.once('connect', () => r()));
      ack(await cloud.timeout(20_000).emitWithAck('envelope', bytes));
    });
    edge.on('disconnect', () => cloud.close());
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  mitm.url = `http://127.0.0.1:${(http.address() as AddressInfo).port}`;
  mitm.close = async () => {
    await io.close();
    http.closeAllConnections();
  };
  return mitm;
}

describe('chunk streams the cloud pushes unasked', () => {
  let node: TestNode;
  let key = '';
  let mitm: Mitm;
  let client: CloudClient;
  before(async () => {
    node = await startTestNode({ limits: LIMITS });
    key = await createTenantKey(node, 'edge');
    mitm = await startMitm(node.url);
    // One resend only: a refused reply must fail fast, not after minutes of backoff.
    client = await connectCloud(mitm.url, { key, retries: 1, requestTimeoutMs: 10_000 });
  });
  after(async () => {
    client?.close();
    await mitm?.close();
  });

  it('are refused and hold nothing; a chunked reply of a real step still reassembles', async () => {
    const { json } = await api(node, 'GET', '/v1/models', key);
    const model = (json.models as ModelDescription[] | undefined ?? []).find((m) => m.id === MODEL_ID);
    assert.ok(model, JSON.stringify(json));
    const session = await client.openSession({
      model: { id: MODEL_ID, contentHash: model.contentHash },
      cut: { bottom: 1, top: 1 },
      codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] },
    });
    assert.equal(session.welcome.limits.maxMessageBytes, LIMITS.maxMessageBytes);

    const shape = [1, 192, 64];
    const reply = await session.request({ case: 'forward', value: { sessionId: session.id, step: 0, microbatch: 0, frames: [frameOf(randomTensor(shape, 1), shape)], needsBackward: false } });
    assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value).slice(0, 300));
    if (reply.body.case === 'forwardResult') assert.deepEqual(reply.body.value.frames[0].shape, shape);
    assert.ok(mitm.replyPushes > 0, 'the real reply came partly as pushed chunks');

    const connection = client.connection;
    assert.deepEqual(connection.reassembly, { openStreams: 0, heldBytes: 0 }, 'the edge holds none of the pushed bytes');
    // The streams nobody asked for are refused; the one on the Hello's reply stream was taken and dropped with the Hello.
    const refused = connection.refusedPushes;
    assert.equal(refused.count, 2 * STREAMS);
    assert.equal(refused.last?.code, 'TANDEM_PROTO_CHUNK_INVALID');
    assert.match(refused.last?.message ?? '', /unasked-late-15/);
  });
});
