// A hostile cloud for the edge's tests: a real node behind a man-in-the-middle that may rewrite
// what the node answers. REST replies pass through `rest`; on the data plane the proxy is a
// socket.io server to the edge and a socket.io client of the node, and every reply envelope
// passes through `reply` decoded. What the edge sent is kept, decoded.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Server } from 'socket.io';
import { io as ioClient } from 'socket.io-client';
import { decodeEnvelope, encodeEnvelope } from '../../protocol/index.ts';
import type { Envelope } from '../../protocol/index.ts';

export interface HostileCloudHooks {
  /** A REST reply's body, by request path. */
  rest?: (path: string, body: Buffer) => Buffer;
  /** The node's reply to an envelope the edge sent. */
  reply?: (request: Envelope, reply: Envelope) => Envelope;
}

export interface HostileCloud {
  url: string;
  /** Every envelope the edge sent (chunks of a chunked message aside). */
  sent: Envelope[];
  close(): Promise<void>;
}

const DECODE = { maxMessageBytes: 1 << 30 };

export async function startHostileCloud(upstream: string, hooks: HostileCloudHooks = {}): Promise<HostileCloud> {
  const sent: Envelope[] = [];
  const server = createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('end', () => {
      void (async () => {
        const headers: Record<string, string> = {};
        for (const [k, v] of Object.entries(req.headers)) if (typeof v === 'string' && k !== 'host' && k !== 'content-length') headers[k] = v;
        const up = await fetch(`${upstream}${req.url}`, { method: req.method, headers, body: req.method === 'GET' || req.method === 'HEAD' ? undefined : Buffer.concat(parts) });
        const body = Buffer.from(await up.arrayBuffer());
        res.writeHead(up.status, { 'content-type': up.headers.get('content-type') ?? 'application/octet-stream' });
        res.end(hooks.rest ? hooks.rest(req.url ?? '', body) : body);
      })().catch(() => res.destroy());
    });
  });
  const io = new Server(server, { transports: ['websocket'], maxHttpBufferSize: 1 << 30, perMessageDeflate: false, serveClient: false });
  io.on('connection', (edge) => {
    const cloud = ioClient(upstream, { transports: ['websocket'], auth: edge.handshake.auth, reconnection: false });
    cloud.on('envelope', (b: unknown) => edge.emit('envelope', b));
    edge.on('envelope', (bytes: Uint8Array, ack: (reply: unknown) => void) => {
      void (async () => {
        const raw = new Uint8Array(bytes);
        let request: Envelope | undefined;
        try {
          request = decodeEnvelope(raw, DECODE);
          sent.push(request);
        } catch {
          // A chunk of a larger message: forwarded as it is.
        }
        if (!cloud.connected) await new Promise((resolve) => cloud.once('connect', () => resolve(undefined)));
        const reply: unknown = await cloud.timeout(60_000).emitWithAck('envelope', raw);
        if (hooks.reply === undefined || request === undefined || !(reply instanceof Uint8Array || Buffer.isBuffer(reply))) return ack(reply);
        ack(encodeEnvelope(hooks.reply(request, decodeEnvelope(new Uint8Array(reply), DECODE))));
      })().catch(() => edge.disconnect());
    });
    edge.on('disconnect', () => cloud.close());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    sent,
    async close() {
      await io.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
