// Found by the adversarial review of stop 22 (the Forward of millions of empty frames is
// test/protocol/wire-scan.test.ts): chunked requests reassembled up to two
// frames of the protocol's 256 MiB maximum, whatever the model needs; a one-byte chunk kept
// its whole 4 MiB envelope alive; stream ids had no length limit; one tenant's incomplete
// streams could take the node's whole reassembly budget; sockets per tenant had no limit;
// what HTTP itself refused came back without a TANDEM_ code.
import assert from 'node:assert/strict';
import { request as httpRequest } from 'node:http';
import { connect as netConnect } from 'node:net';
import { before, describe, it } from 'node:test';
import { io } from 'socket.io-client';
import { Reassembler, crc32, decodeEnvelope, encodeEnvelope, envelope, splitMessage } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

const details = (reply: Envelope): Record<string, string> => (reply.body.case === 'error' ? reply.body.value.details : {});
const CONNECTIONS = 3;
const TENANT_SHARE = 256 * 1024;
let node: TestNode;
let good: Bystander;

before(async () => {
  // The node's budget is larger than one tenant's share: the share is what refuses.
  node = await startTestNode({ reassemblyBudgetBytes: 4 * TENANT_SHARE, chunkStreamTimeoutMs: 60_000, tenantQuotas: { mallory: { reassemblyBytes: TENANT_SHARE }, crowd: { connections: CONNECTIONS } } });
  good = await bystander(node);
});

describe('data-plane limits found by the review', () => {
  it('a chunked request reassembles only up to what a session can need, not two frames of the protocol\'s maximum', async () => {
    const attacker = await TestClient.connect(node, await createTenantKey(node, 'large'));
    // The test node's sessions take frames of at most 64 KiB (TEST_LIMITS): a request of 4 MB is refused at its first chunk.
    const [first] = splitMessage(new Uint8Array(4_000_000), 'large', 16 * 1024);
    const reply = await survives(node, good, async () => decodeEnvelope((await attacker.sendRaw(first)) as Uint8Array));
    assertError(reply, 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
    assert.equal(details(reply).field, 'message bytes');
    assert.equal(Number(details(reply).limit), 2 * 64 * 1024 + 64 * 1024, 'two frames of the session\'s largest, and slack');
  });

  it('a reassembled message is its own copy: a small chunk does not keep its envelope alive', () => {
    const message = new Uint8Array(3000).map((_, i) => i % 251);
    const [first, second] = splitMessage(message, 's', 2048).map((b) => decodeEnvelope(b).body);
    assert.ok(first.case === 'chunk' && second.case === 'chunk');
    const r = new Reassembler();
    assert.equal(r.accept(first.value), null);
    first.value.data.fill(0); // the received bytes are reused (or freed) after accept
    const whole = r.accept(second.value);
    assert.deepEqual(whole, message);
  });

  it('a stream id over the limit is refused at its first chunk', async () => {
    const attacker = await TestClient.connect(node, await createTenantKey(node, 'ids'));
    // A short request id (checked on its own) carrying a chunk whose stream id is long.
    const data = new Uint8Array(1000);
    const chunk = encodeEnvelope(envelope('short', { case: 'chunk', value: { streamId: 'x'.repeat(2000), index: 0, count: 2, totalBytes: 2000, crc32: crc32(data), data } }));
    const reply = decodeEnvelope((await attacker.sendRaw(chunk)) as Uint8Array);
    assertError(reply, 'TANDEM_PROTO_CHUNK_INVALID');
    assert.match(reply.body.case === 'error' ? reply.body.value.message : '', /2000 characters, over the limit of 320/);
  });

  it('one tenant\'s incomplete streams stop at its share; another tenant\'s chunked step still goes through', async () => {
    const key = await createTenantKey(node, 'mallory');
    // Two sockets: one socket's streams may declare two requests' worth (384 KiB) together.
    const sockets = [await TestClient.connect(node, key), await TestClient.connect(node, key)];
    const declared = new Uint8Array(150 * 1024);
    const acks: Envelope[] = [];
    for (let i = 0; i < 3 && acks.length === 0; i++) {
      // About 112 KiB of each 150 KiB stream (7 chunks of 16 KiB), never the last chunk.
      const chunks = splitMessage(declared, `hold-${i}`, 16 * 1024);
      for (const c of chunks.slice(0, 7)) {
        const ack = await sockets[i === 2 ? 1 : 0].sendRaw(c);
        if (ack !== null) {
          acks.push(decodeEnvelope(ack as Uint8Array));
          assert.equal(i, 2, 'the third stream passes the 256 KiB share');
          break;
        }
      }
    }
    assert.equal(acks.length, 1);
    assertError(acks[0], 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
    assert.match(details(acks[0]).field, /for this tenant/);
    assert.equal(details(acks[0]).limit, String(TENANT_SHARE));
    // The node's budget has room: a good tenant's chunked Forward (a 32 KiB frame in 3 chunks) goes through.
    const big: [number, number, number] = [2, 64, HIDDEN];
    const fwd = await good.client.request(good.client.forwardBody(100, 0, [frameOf(randomTensor(big, 4), big)], false));
    assert.equal(fwd.body.case, 'forwardResult', JSON.stringify(fwd.body.value));
    for (const socket of sockets) socket.close();
  });

  it('a tenant\'s sockets stop at its connections quota, and a closed one makes room', async () => {
    const key = await createTenantKey(node, 'crowd');
    const open = [];
    for (let i = 0; i < CONNECTIONS; i++) open.push(await TestClient.connect(node, key));
    await assert.rejects(TestClient.connect(node, key), (error: Error & { data?: { code?: string; message?: string } }) => {
      assert.equal(error.data?.code, 'TANDEM_QUOTA_EXCEEDED', error.message);
      assert.match(error.data?.message ?? '', /connections/);
      return true;
    });
    // Another tenant is not counted against this one's.
    (await TestClient.connect(node, await createTenantKey(node, 'other'))).close();
    const closed = open.pop() as TestClient;
    const gone = new Promise((resolve) => closed.socket.once('disconnect', resolve));
    closed.close();
    await gone;
    for (let tries = 0; ; tries++) {
      // The node sees the disconnect a moment after the client.
      const socket = io(node.url, { transports: ['websocket'], auth: { key }, reconnection: false, forceNew: true });
      const ok = await new Promise<boolean>((resolve) => { socket.once('connect', () => resolve(true)); socket.once('connect_error', () => resolve(false)); });
      socket.disconnect();
      if (ok) break;
      assert.ok(tries < 20, 'a closed socket makes room');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    for (const c of open) c.close();
  });

  it('what HTTP refuses before a route (headers over 16 KiB, an unknown method) has a TANDEM_ code', async () => {
    const { port } = new URL(node.url);
    const big = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = httpRequest({ host: '127.0.0.1', port, path: '/v1/health', headers: { 'x-padding': 'a'.repeat(20_000) } }, (res) => {
        let body = '';
        res.on('data', (c: Buffer) => { body += c.toString(); });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
      req.end();
    });
    assert.equal(big.status, 431);
    assert.equal(JSON.parse(big.body).code, 'TANDEM_REQUEST_INVALID');
    const raw = await new Promise<string>((resolve, reject) => {
      const socket = netConnect(Number(port), '127.0.0.1', () => socket.write('FOO /v1/health HTTP/1.1\r\nHost: x\r\n\r\n'));
      let text = '';
      socket.on('data', (c: Buffer) => { text += c.toString(); });
      socket.on('end', () => resolve(text));
      socket.on('error', reject);
    });
    assert.match(raw, /^HTTP\/1\.1 400 /);
    assert.equal(JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)).code, 'TANDEM_REQUEST_INVALID');
  });

  it('a URL that does not decode, a parameter over its length, an Expect other than 100-continue and an Upgrade to a REST path have a TANDEM_ code too (found by fuzzing)', async () => {
    const { port } = new URL(node.url);
    /** The raw answer to `request`, read until the node closes the connection or a whole body has come. */
    const rawAnswer = (request: string) => new Promise<{ status: number; json: Record<string, unknown> }>((resolve, reject) => {
      const socket = netConnect(Number(port), '127.0.0.1', () => socket.write(request));
      let text = '';
      const done = (): void => {
        const at = text.indexOf('\r\n\r\n');
        socket.destroy();
        try {
          resolve({ status: Number(text.slice(9, 12)), json: JSON.parse(text.slice(at + 4)) as Record<string, unknown> });
        } catch {
          reject(new Error(`not a JSON answer: ${JSON.stringify(text.slice(0, 300))}`));
        }
      };
      socket.setTimeout(10_000, () => reject(new Error(`no answer to ${JSON.stringify(request.slice(0, 60))}`)));
      socket.on('data', (c: Buffer) => {
        text += c.toString();
        const at = text.indexOf('\r\n\r\n');
        const length = /content-length: (\d+)/i.exec(text.slice(0, at));
        if (at >= 0 && length && Buffer.byteLength(text.slice(at + 4)) >= Number(length[1])) done();
      });
      socket.on('end', done);
      socket.on('error', reject);
    });
    const cases: [string, number][] = [
      ['GET /v1/health/%ff HTTP/1.1\r\nHost: x\r\n\r\n', 400],
      [`GET /v1/sessions/${'x'.repeat(101)} HTTP/1.1\r\nHost: x\r\n\r\n`, 414],
      ['POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nContent-Length: 2\r\n\r\n{}', 417],
      ['GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n', 400],
      ['GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n', 400],
    ];
    for (const [request, status] of cases) {
      const answer = await rawAnswer(request);
      assert.deepEqual([answer.status, answer.json.code], [status, 'TANDEM_REQUEST_INVALID'], `${JSON.stringify(request.slice(0, 60))}: ${JSON.stringify(answer.json)}`);
    }
    // The data plane still upgrades.
    const socket = io(node.url, { transports: ['websocket'], auth: { key: node.adminKey }, reconnection: false });
    await new Promise<void>((resolve, reject) => {
      socket.on('connect', resolve);
      socket.on('connect_error', reject);
    });
    socket.close();
  });
});
