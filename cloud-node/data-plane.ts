// socket.io on the node's HTTP server: websocket only, binary protocol v1 envelopes on one
// event, `envelope`, each answered through its ack. A message larger than the peer's
// max message bytes travels as Chunk envelopes; the reply to a chunked request comes on
// the ack of its last chunk (earlier chunks are acked with null); a reply too large is
// acked as an array of Chunk envelopes (a single envelope is acked as itself), or, when
// there are more than MAX_ACK_CHUNKS of them, all but the last are emitted as `envelope`
// events to the client first (in order, on the same socket) and the last one is the ack:
// socket.io's parser takes at most 10 binary attachments in one packet.
import type { IncomingMessage, Server as HttpServer } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { Server } from 'socket.io';
import type { Socket } from 'socket.io';
import {
  ProtocolError, ReassemblyBudget, Reassembler, decodeEnvelope, encodeEnvelope, envelope, errorBody, messagesForTransport, replyStreamId,
} from '../protocol/index.ts';
import type { Envelope, ErrorBody, Limits } from '../protocol/index.ts';
import { CloudError, rawRefusal, resourceErrorOf } from './errors.ts';
import { quotaExceeded } from './quotas.ts';
import type { CloudMetrics } from './metrics.ts';
import type { QuotaLedger } from './quotas.ts';
import type { SessionService } from './session-service.ts';
import type { KeyRecords } from './state/key-records.ts';
import type { Caller } from './state/key-store.ts';

export const ENVELOPE_EVENT = 'envelope';
/** Room for socket.io's own framing above the largest envelope. */
const TRANSPORT_SLACK_BYTES = 64 * 1024;
/** Chunks acked in one packet; more go as events first (socket.io's parser allows 10 attachments). */
export const MAX_ACK_CHUNKS = 8;
/** Longest request id: it names the reply's chunk stream, whose header must leave room for data. */
export const MAX_REQUEST_ID_CHARS = 256;
export const DEFAULT_REASSEMBLY_BUDGET_BYTES = 512 * 1024 * 1024;
export const DEFAULT_CHUNK_STREAM_TIMEOUT_MS = 30_000;

export type EnvelopeAck = (reply: Uint8Array | Uint8Array[] | null) => void;

export interface DataPlaneOptions {
  server: HttpServer;
  keys: KeyRecords;
  service: SessionService;
  metrics: CloudMetrics;
  limits: Limits;
  quotas: QuotaLedger;
  log: Logger;
  /** Bytes all incomplete chunked requests of all sockets may hold together. */
  reassemblyBudgetBytes?: number;
  /** A chunked request with no chunk for this long is dropped. */
  chunkStreamTimeoutMs?: number;
}

/** The Error body for anything a handler threw; unexpected errors are logged and reported as TANDEM_INTERNAL. */
export function errorBodyOf(error: unknown, log: Logger): ErrorBody {
  if (error instanceof ProtocolError) return errorBody(error);
  const resource = resourceErrorOf(error, 'memory');
  if (resource !== undefined) {
    log.warn({ err: error }, 'a request ran out of a resource');
    error = resource;
  }
  if (error instanceof CloudError) {
    const details: Record<string, string> = {};
    for (const [key, value] of Object.entries(error.details)) details[key] = String(value);
    return { code: error.code, message: error.describe(), details };
  }
  log.error({ err: error }, 'unexpected error in the data plane');
  return { code: 'TANDEM_INTERNAL', message: 'TANDEM_INTERNAL: internal error', details: {} };
}

function checkedRequestId(requestId: string): string {
  if (requestId.length > MAX_REQUEST_ID_CHARS) {
    throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'envelope.request_id', reason: `${requestId.length} characters, over the limit of ${MAX_REQUEST_ID_CHARS}` });
  }
  return requestId;
}

/** The path socket.io upgrades (its default); every other upgrade is refused with a typed body. */
const SOCKET_IO_PATH = '/socket.io/';

function refuseUpgrade(request: IncomingMessage, socket: Duplex): void {
  if ((request.url ?? '').startsWith(SOCKET_IO_PATH) || !socket.writable) return;
  socket.end(rawRefusal(400, `only the data plane (${SOCKET_IO_PATH}, a websocket) upgrades; send ${JSON.stringify((request.url ?? '').slice(0, 64))} without Upgrade`));
}

export function attachDataPlane(options: DataPlaneOptions): Server {
  const { keys, service, metrics, limits, quotas, log } = options;
  // Chunked requests reassemble up to the largest a session can need (a Backward of two full
  // micro-batch frames in f32), not two frames of the protocol's maximum (512 MiB).
  const reassemblyLimit = (): number => {
    try {
      return service.maxRequestBytes + TRANSPORT_SLACK_BYTES;
    } catch {
      return 2 * limits.maxFrameBytes + TRANSPORT_SLACK_BYTES; // no model served yet: every request is refused later anyway
    }
  };
  const budget = new ReassemblyBudget(options.reassemblyBudgetBytes ?? DEFAULT_REASSEMBLY_BUDGET_BYTES);
  // Each tenant's share of it (one tenant's incomplete streams cannot hold everyone's), and its sockets.
  const tenants = new Map<string, { budget: ReassemblyBudget; sockets: number }>();
  const tenantOf = (tenant: string): { budget: ReassemblyBudget; sockets: number } => {
    let t = tenants.get(tenant);
    if (t === undefined) {
      // Never below one whole request: a tenant can always send its largest.
      t = { budget: new ReassemblyBudget(Math.max(quotas.of(tenant).reassemblyBytes, reassemblyLimit()), { name: 'bytes being reassembled for this tenant (its reassemblyBytes quota)', parent: budget }), sockets: 0 };
      tenants.set(tenant, t);
    }
    return t;
  };
  const tooManySockets = (caller: Caller): CloudError | undefined => {
    const limit = quotas.of(caller.tenant).connections;
    const open = tenants.get(caller.tenant)?.sockets ?? 0;
    return open >= limit ? quotaExceeded(caller.tenant, 'connections', limit, `${open} sockets of this tenant are connected; close one`) : undefined;
  };
  const streamTimeoutMs = options.chunkStreamTimeoutMs ?? DEFAULT_CHUNK_STREAM_TIMEOUT_MS;
  const reassemblers = new Set<Reassembler>();
  // Streams that stopped mid-way give their bytes back even when their socket stays silent.
  const sweep = setInterval(() => {
    for (const r of reassemblers) for (const streamId of r.expire()) log.warn({ streamId }, 'chunked request timed out');
  }, Math.max(100, Math.min(5_000, streamTimeoutMs)));
  sweep.unref();
  options.server.once('close', () => clearInterval(sweep));
  const io = new Server(options.server, {
    transports: ['websocket'],
    maxHttpBufferSize: limits.maxMessageBytes + TRANSPORT_SLACK_BYTES,
    perMessageDeflate: false,
    serveClient: false,
    // Upgrades to other paths are answered below, not dropped after a second without a word.
    destroyUpgrade: false,
  });
  // With an upgrade listener, Node hands every request carrying Upgrade (curl --http2's h2c,
  // a websocket to a REST path) to the listeners, never to fastify.
  options.server.on('upgrade', refuseUpgrade);

  io.use((socket, next) => {
    const auth = socket.handshake.auth as { key?: unknown } | undefined;
    keys.authenticate(auth?.key).then((caller) => {
      const refused = tooManySockets(caller);
      if (refused !== undefined) throw refused;
      return caller;
    }).then(
      (caller) => {
        socket.data.caller = caller;
        next();
      },
      (error: unknown) => {
        const body = errorBodyOf(error, log);
        metrics.errors.inc({ code: body.code });
        next(Object.assign(new Error(body.message), { data: { code: body.code, message: body.message } }));
      },
    );
  });

  io.on('connection', (socket: Socket) => {
    const caller = socket.data.caller as Caller;
    const socketLog = log.child({ socket: socket.id, tenant: caller.tenant });
    // Handshakes authenticate concurrently: the count is checked again once the socket is in.
    const over = tooManySockets(caller);
    if (over !== undefined) {
      metrics.errors.inc({ code: over.code });
      socketLog.warn({ code: over.code }, over.message);
      socket.disconnect(true);
      return;
    }
    const tenant = tenantOf(caller.tenant);
    tenant.sockets++;
    const requestLimit = reassemblyLimit();
    const reassembler = new Reassembler({ maxMessageBytes: requestLimit, maxTotalBytes: 2 * requestLimit, budget: tenant.budget, streamTimeoutMs });
    reassemblers.add(reassembler);
    metrics.connections.inc();
    socketLog.info('socket connected');

    const deliver = (ack: EnvelopeAck, bytes: Uint8Array, maxMessageBytes: number, requestId: string): void => {
      const parts = messagesForTransport(bytes, replyStreamId(requestId), maxMessageBytes);
      for (const part of parts) metrics.messageBytes.inc({ direction: 'out' }, part.length);
      if (parts.length === 1) ack(parts[0]);
      else if (parts.length <= MAX_ACK_CHUNKS) ack(parts);
      else {
        for (const part of parts.slice(0, -1)) socket.emit(ENVELOPE_EVENT, part);
        ack(parts[parts.length - 1]);
      }
    };
    const fail = (ack: EnvelopeAck, requestId: string, error: unknown): void => {
      const body = errorBodyOf(error, socketLog);
      metrics.errors.inc({ code: body.code });
      socketLog.warn({ code: body.code, requestId }, body.message);
      send(ack, encodeEnvelope(envelope(requestId, { case: 'error', value: body })), limits.maxMessageBytes, requestId, true);
    };
    // Nothing thrown while replying leaves the handler: the client gets an Error reply, or
    // (when even that cannot be sent) the failure is logged and the ack carries null.
    const send = (ack: EnvelopeAck, bytes: Uint8Array, maxMessageBytes: number, requestId: string, isError = false): void => {
      try {
        deliver(ack, bytes, maxMessageBytes, requestId);
      } catch (error) {
        if (!isError) {
          fail(ack, requestId, error);
          return;
        }
        socketLog.error({ err: error, requestId }, 'an error reply could not be sent');
        try {
          ack(null);
        } catch {
          // the socket is gone
        }
      }
    };

    socket.on(ENVELOPE_EVENT, (payload: unknown, ack: unknown) => {
      if (typeof ack !== 'function') {
        socketLog.warn('envelope without an ack callback: nothing to reply to, dropped');
        return;
      }
      const reply = ack as EnvelopeAck;
      if (!(payload instanceof Uint8Array)) {
        fail(reply, '', new ProtocolError('TANDEM_PROTO_MESSAGE_MALFORMED', { reason: 'the envelope event must carry binary bytes' }));
        return;
      }
      metrics.messageBytes.inc({ direction: 'in' }, payload.length);
      let request: Envelope;
      let requestId = '';
      try {
        quotas.chargeBytes(caller.tenant, payload.length);
        request = decodeEnvelope(payload, { maxMessageBytes: limits.maxMessageBytes });
        requestId = checkedRequestId(request.requestId);
        if (request.body.case === 'chunk') {
          // Chunks are accepted in arrival order, before anything awaits.
          const whole = reassembler.accept(request.body.value);
          if (whole === null) {
            reply(null);
            return;
          }
          request = decodeEnvelope(whole, { maxMessageBytes: requestLimit });
          requestId = '';
          requestId = checkedRequestId(request.requestId);
        }
      } catch (error) {
        fail(reply, requestId, error);
        return;
      }
      service.handle(caller, request).then(
        (result) => send(reply, result.bytes, result.maxMessageBytes, requestId),
        (error: unknown) => fail(reply, requestId, error),
      );
    });

    socket.on('disconnect', (reason) => {
      metrics.connections.dec();
      reassemblers.delete(reassembler);
      tenant.sockets--;
      for (const streamId of reassembler.openStreams) {
        try {
          reassembler.close(streamId);
        } catch (error) {
          // The client left mid-request: nobody to tell, the session stays for a reconnect.
          const body = errorBodyOf(error, socketLog);
          metrics.errors.inc({ code: body.code });
          socketLog.warn({ code: body.code, streamId }, `client vanished mid-request: ${body.message}`);
        }
      }
      if (tenant.sockets === 0 && tenant.budget.used === 0) tenants.delete(caller.tenant);
      socketLog.info({ reason }, 'socket disconnected');
    });
  });
  return io;
}
