// socket.io on the node's HTTP server: websocket only, binary protocol v1 envelopes on one
// event, `envelope`, each answered through its ack. A message larger than the peer's
// max message bytes travels as Chunk envelopes; the reply to a chunked request comes on
// the ack of its last chunk (earlier chunks are acked with null); a reply too large is
// acked as an array of Chunk envelopes (a single envelope is acked as itself).
import type { Server as HttpServer } from 'node:http';
import type { Logger } from 'pino';
import { Server } from 'socket.io';
import type { Socket } from 'socket.io';
import { ProtocolError, Reassembler, decodeEnvelope, encodeEnvelope, envelope, errorBody, messagesForTransport } from '../protocol/index.ts';
import type { Envelope, ErrorBody, Limits } from '../protocol/index.ts';
import { CloudError } from './errors.ts';
import type { CloudMetrics } from './metrics.ts';
import type { QuotaLedger } from './quotas.ts';
import type { SessionService } from './session-service.ts';
import type { Caller, KeyStore } from './state/key-store.ts';

export const ENVELOPE_EVENT = 'envelope';
/** Room for socket.io's own framing above the largest envelope. */
const TRANSPORT_SLACK_BYTES = 64 * 1024;

export type EnvelopeAck = (reply: Uint8Array | Uint8Array[] | null) => void;

export interface DataPlaneOptions {
  server: HttpServer;
  keys: KeyStore;
  service: SessionService;
  metrics: CloudMetrics;
  limits: Limits;
  quotas: QuotaLedger;
  log: Logger;
}

/** The Error body for anything a handler threw; unexpected errors are logged and reported as TANDEM_INTERNAL. */
export function errorBodyOf(error: unknown, log: Logger): ErrorBody {
  if (error instanceof ProtocolError) return errorBody(error);
  if (error instanceof CloudError) {
    const details: Record<string, string> = {};
    for (const [key, value] of Object.entries(error.details)) details[key] = String(value);
    return { code: error.code, message: error.describe(), details };
  }
  log.error({ err: error }, 'unexpected error in the data plane');
  return { code: 'TANDEM_INTERNAL', message: 'TANDEM_INTERNAL: internal error', details: {} };
}

export function attachDataPlane(options: DataPlaneOptions): Server {
  const { keys, service, metrics, limits, quotas, log } = options;
  // Chunked requests reassemble up to one Backward with two full frames.
  const reassemblyLimit = 2 * limits.maxFrameBytes + TRANSPORT_SLACK_BYTES;
  const io = new Server(options.server, {
    transports: ['websocket'],
    maxHttpBufferSize: limits.maxMessageBytes + TRANSPORT_SLACK_BYTES,
    perMessageDeflate: false,
    serveClient: false,
  });

  io.use((socket, next) => {
    const auth = socket.handshake.auth as { key?: unknown } | undefined;
    keys.authenticate(auth?.key).then(
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
    const reassembler = new Reassembler({ maxMessageBytes: reassemblyLimit, maxTotalBytes: 2 * reassemblyLimit });
    metrics.connections.inc();
    socketLog.info('socket connected');

    const send = (ack: EnvelopeAck, bytes: Uint8Array, maxMessageBytes: number, requestId: string): void => {
      const parts = messagesForTransport(bytes, `${requestId}/reply`, maxMessageBytes);
      for (const part of parts) metrics.messageBytes.inc({ direction: 'out' }, part.length);
      ack(parts.length === 1 ? parts[0] : parts);
    };
    const fail = (ack: EnvelopeAck, requestId: string, error: unknown): void => {
      const body = errorBodyOf(error, socketLog);
      metrics.errors.inc({ code: body.code });
      socketLog.warn({ code: body.code, requestId }, body.message);
      send(ack, encodeEnvelope(envelope(requestId, { case: 'error', value: body })), limits.maxMessageBytes, requestId);
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
        requestId = request.requestId;
        if (request.body.case === 'chunk') {
          // Chunks are accepted in arrival order, before anything awaits.
          const whole = reassembler.accept(request.body.value);
          if (whole === null) {
            reply(null);
            return;
          }
          request = decodeEnvelope(whole, { maxMessageBytes: reassemblyLimit });
        }
      } catch (error) {
        fail(reply, requestId, error);
        return;
      }
      requestId = request.requestId;
      service.handle(caller, request).then(
        (result) => send(reply, result.bytes, result.maxMessageBytes, requestId),
        (error: unknown) => fail(reply, requestId, error),
      );
    });

    socket.on('disconnect', (reason) => {
      metrics.connections.dec();
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
      socketLog.info({ reason }, 'socket disconnected');
    });
  });
  return io;
}
