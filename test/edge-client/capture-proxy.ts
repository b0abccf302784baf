// A loopback proxy between an edge and a cloud node that records every byte the edge sends:
// REST requests (method, URL, headers, body) and, on the data plane, every websocket message
// (socket.io's text packets and binary attachments, which are the protobuf envelopes).
import { createServer, request as httpRequest } from 'node:http';
import type { IncomingMessage, Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';

export interface Capture {
  url: string;
  /** Everything the edge sent over REST: request line, headers and body, one buffer per request. */
  rest: Buffer[];
  /** Every websocket message the edge sent, in order. */
  ws: { binary: boolean; data: Buffer }[];
  close(): Promise<void>;
}

async function body(req: IncomingMessage): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of req) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

export async function startCaptureProxy(target: string): Promise<Capture> {
  const upstream = new URL(target);
  const rest: Buffer[] = [];
  const ws: Capture['ws'] = [];
  const sockets = new Set<WebSocket>();
  const server: Server = createServer((req, res) => {
    void body(req).then((data) => {
      rest.push(Buffer.concat([Buffer.from(`${req.method} ${req.url}\n${JSON.stringify(req.headers)}\n`), data]));
      const out = httpRequest({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: { ...req.headers, host: upstream.host } }, (up) => {
        res.writeHead(up.statusCode ?? 502, up.headers);
        up.pipe(res);
      });
      out.on('error', () => res.destroy());
      out.end(data);
    });
  });
  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req, socket, head) => {
    wss.handleUpgrade(req, socket, head, (edge) => {
      const cloud = new WebSocket(`ws://${upstream.host}${req.url ?? '/'}`);
      sockets.add(edge);
      sockets.add(cloud);
      const pending: { data: Buffer; binary: boolean }[] = [];
      edge.on('message', (data: Buffer, binary: boolean) => {
        ws.push({ binary, data: Buffer.from(data) });
        if (cloud.readyState === WebSocket.OPEN) cloud.send(data, { binary });
        else pending.push({ data, binary });
      });
      cloud.on('open', () => {
        for (const p of pending.splice(0)) cloud.send(p.data, { binary: p.binary });
      });
      cloud.on('message', (data: Buffer, binary: boolean) => edge.readyState === WebSocket.OPEN && edge.send(data, { binary }));
      edge.on('close', () => cloud.close());
      cloud.on('close', () => edge.close());
      edge.on('error', () => cloud.terminate());
      cloud.on('error', () => edge.terminate());
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    rest,
    ws,
    async close() {
      for (const s of sockets) s.terminate();
      wss.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
