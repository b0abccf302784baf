// The data-plane connection: socket.io over websocket, one event `envelope` whose ack is
// the reply. A request is encoded once and resent byte for byte after a timeout or a
// reconnect, so a retry is the same (session, step, microbatch) with the same content
// (error feedback has already been applied once). After a reconnect nothing is sent until
// the session is reattached.
import { io } from 'socket.io-client';
import type { Socket } from 'socket.io-client';
import { AUTH_ERROR_CODES, DEFAULT_LIMITS, ProtocolError, Reassembler, WIRE_ERRORS, decodeEnvelope, encodeEnvelope, messagesForTransport, replyStreamId } from '../protocol/index.ts';
import type { Envelope } from '../protocol/index.ts';
import { tlsTrustFailure, tlsUntrusted } from './download.ts';
import { EdgeError } from './errors.ts';

/** The event the cloud sends, `{code, message}`, just before it disconnects a socket for good (a revoked key). */
export const DISCONNECT_REASON_EVENT = 'tandem:disconnect';

export interface ConnectionOptions {
  key: string;
  /** How long one send waits for its ack before it is retried. */
  requestTimeoutMs?: number;
  /** Sends of one request after the first; a send waiting for a reconnect does not count. */
  retries?: number;
  /** First retry delay; doubles each retry up to maxBackoffMs. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** How long to wait for the (re)connection before a request fails. */
  connectTimeoutMs?: number;
  /** PEM CA certificate(s) an https:// cloud's certificate must chain to, instead of the system's. */
  ca?: string;
}

/** Traffic counters; bytes are the encoded envelopes on the wire. */
export interface ConnectionStats {
  bytesSent: number;
  bytesReceived: number;
  requests: number;
  retries: number;
  reconnects: number;
  /** Mean round-trip time of the answered sends, in milliseconds. */
  meanRttMs: number;
  lastRttMs: number;
}

/** Codes of Error replies that a retry of the same request may cure. */
const RETRYABLE_REMOTE = new Set<string>([WIRE_ERRORS.modelNotReady, WIRE_ERRORS.storeFull, WIRE_ERRORS.heldAdapterMoved, WIRE_ERRORS.heldCheckpointUnavailable]);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function toBytes(x: unknown): Uint8Array | undefined {
  if (x instanceof Uint8Array) return x;
  if (x instanceof ArrayBuffer) return new Uint8Array(x);
  return undefined;
}

export interface RequestOptions {
  /** Send even while the session is being reattached (the reattach request itself). */
  beforeReattach?: boolean;
  /** Overrides ConnectionOptions.retries for this request. */
  retries?: number;
}

/** Reconnects to one gateway before the next of several is tried. */
const ATTEMPTS_PER_URL = 2;

/** Characters of a refused stream id kept in the error: the id is the peer's, of any length. */
const REFUSED_ID_CHARS = 64;

/** A request being answered: sends of the same request id, and the reply streams they opened. */
interface InFlight {
  requests: number;
  streams: Set<string>;
}

/** What the reply reassembler holds: only the reply streams of requests in flight. */
export interface ReassemblyState {
  openStreams: number;
  heldBytes: number;
}

export class CloudConnection {
  /** The socket to the current URL (replaced when several URLs are given and one is gone). */
  socket: Socket;
  readonly stats: ConnectionStats = { bytesSent: 0, bytesReceived: 0, requests: 0, retries: 0, reconnects: 0, meanRttMs: 0, lastRttMs: 0 };
  /** The negotiated limit; larger envelopes go as chunks. */
  maxMessageBytes: number = DEFAULT_LIMITS.maxMessageBytes;
  private readonly options: Required<Omit<ConnectionOptions, 'ca'>>;
  /** Set when the cloud said why it disconnected us for good: every later request fails with it. */
  private refusal?: EdgeError;
  private readonly reassembler: Reassembler;
  /** By request id; a pushed chunk must belong to the reply stream of one of these. */
  private readonly inFlight = new Map<string, InFlight>();
  private refusedPushCount = 0;
  private lastRefusedPush?: ProtocolError;
  private reattach?: () => Promise<void>;
  private ready: Promise<void> = Promise.resolve();
  private closed = false;
  private connectedOnce = false;
  private rttCount = 0;
  private streamCounter = 0;
  private readonly urls: string[];
  private urlIndex = 0;
  /** Told when the socket is replaced by one to the next URL. */
  private swapListeners: (() => void)[] = [];

  private constructor(urls: string[], options: ConnectionOptions) {
    this.urls = urls;
    this.options = {
      key: options.key,
      requestTimeoutMs: options.requestTimeoutMs ?? 30_000,
      retries: options.retries ?? 8,
      backoffMs: options.backoffMs ?? 100,
      maxBackoffMs: options.maxBackoffMs ?? 3_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 60_000,
    };
    // A reply stream with no chunk for as long as a send waits for its ack belongs to a send
    // that has timed out (the resend starts it over); the default is the cloud's 30 s.
    this.reassembler = new Reassembler({ maxMessageBytes: DEFAULT_LIMITS.maxFrameBytes, streamTimeoutMs: this.options.requestTimeoutMs });
    this.socket = this.makeSocket(urls[0], options);
  }

  /** A socket to `url` with every handler; with several URLs it gives up after a few reconnects and the next URL is tried. */
  private makeSocket(url: string, options: ConnectionOptions): Socket {
    const several = this.urls.length > 1;
    const socket = io(url, {
      transports: ['websocket'],
      auth: { key: options.key },
      autoConnect: false,
      reconnection: true,
      reconnectionDelay: 100,
      reconnectionDelayMax: 2_000,
      randomizationFactor: 0.2,
      ...(several ? { reconnectionAttempts: ATTEMPTS_PER_URL } : {}),
      ...(options.ca === undefined ? {} : { ca: options.ca }),
    });
    socket.on(DISCONNECT_REASON_EVENT, (reason: { code?: unknown; message?: unknown } | undefined) => {
      const code = typeof reason?.code === 'string' ? reason.code : 'TANDEM_AUTH_KEY_REVOKED';
      const message = typeof reason?.message === 'string' ? reason.message : code;
      this.refusal = new EdgeError('TANDEM_EDGE_AUTH_FAILED', `the cloud disconnected this client: ${message}`, { where: url, remoteCode: code });
    });
    socket.on('connect', () => {
      if (this.connectedOnce) this.onReconnect();
      this.connectedOnce = true;
    });
    // Reply chunks that do not fit one packet arrive as `envelope` events before the ack.
    socket.on('envelope', (bytes: unknown) => this.acceptPushed(bytes));
    socket.on('disconnect', (reason) => {
      // A server that shuts down disconnects its sockets itself, and socket.io does not
      // reconnect after that on its own; a restarted node is worth waiting for.
      if (reason === 'io server disconnect' && !this.closed && this.refusal === undefined) socket.connect();
    });
    if (several) socket.io.on('reconnect_failed', () => this.nextUrl(options));
    return socket;
  }

  /** This gateway stays unreachable: the next URL (the sessions are in the cluster's state, SessionOpen reattaches). */
  private nextUrl(options: ConnectionOptions): void {
    if (this.closed || this.refusal !== undefined) return;
    const old = this.socket;
    old.removeAllListeners();
    old.disconnect();
    old.io.removeAllListeners();
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    this.socket = this.makeSocket(this.urls[this.urlIndex], options);
    const listeners = this.swapListeners;
    this.swapListeners = [];
    for (const l of listeners) l();
    this.socket.connect();
  }

  /** Opens the connection; fails with TANDEM_EDGE_AUTH_FAILED or TANDEM_EDGE_CONNECT_FAILED. */
  static async open(url: string | string[], options: ConnectionOptions): Promise<CloudConnection> {
    const c = new CloudConnection(typeof url === 'string' ? [url] : url, options);
    c.socket.connect();
    try {
      await c.waitConnected();
    } catch (err) {
      c.close();
      throw err;
    }
    return c;
  }

  /** Called after every reconnect, before any other request is sent. */
  onReattach(handler: () => Promise<void>): void {
    this.reattach = handler;
  }

  private onReconnect(): void {
    this.stats.reconnects += 1;
    const handler = this.reattach;
    if (!handler) return;
    const run = async (): Promise<void> => {
      // A reattach that fails on a connection that drops again is retried on the next connect.
      await handler();
    };
    this.ready = run();
    this.ready.catch(() => undefined);
  }

  private async waitConnected(): Promise<void> {
    const deadline = Date.now() + this.options.connectTimeoutMs;
    for (;;) {
      const socket = this.socket;
      const swapped = await this.waitConnectedOnce(Math.max(1, deadline - Date.now()));
      if (!swapped || this.socket === socket) return;
    }
  }

  /** true when the socket was replaced (the next URL) before it connected. */
  private waitConnectedOnce(timeoutMs: number): Promise<boolean> {
    if (this.refusal !== undefined) return Promise.reject(this.refusal);
    if (this.closed) return Promise.reject(new EdgeError('TANDEM_EDGE_CLOSED', 'the connection is closed'));
    if (this.socket.connected) return Promise.resolve(false);
    const socket = this.socket;
    return new Promise((resolve, reject) => {
      const done = (err?: Error, swapped = false): void => {
        clearTimeout(timer);
        socket.off('connect', onConnect);
        socket.off('connect_error', onError);
        this.swapListeners = this.swapListeners.filter((l) => l !== onSwap);
        if (err) reject(err);
        else resolve(swapped);
      };
      const onSwap = (): void => done(undefined, true);
      this.swapListeners.push(onSwap);
      const onConnect = (): void => done();
      const onError = (err: Error & { data?: unknown }): void => {
        // A certificate that does not verify will not verify on a retry either.
        const tls = tlsTrustFailure(err);
        if (tls !== undefined) {
          done(tlsUntrusted(this.url, tls, err));
          return;
        }
        // A refusal by the server's middleware is final: socket.io does not retry it.
        if (socket.active) return;
        const data = err.data as { code?: unknown } | undefined;
        const remoteCode = typeof data?.code === 'string' ? data.code : undefined;
        const auth = (AUTH_ERROR_CODES as readonly unknown[]).includes(remoteCode) || /auth|key/i.test(err.message);
        // Out of reconnects to this URL: the next one is tried (nextUrl), unless the key was refused.
        if (!auth && this.urls.length > 1) return;
        done(new EdgeError(auth ? 'TANDEM_EDGE_AUTH_FAILED' : 'TANDEM_EDGE_CONNECT_FAILED', `the cloud refused the connection: ${err.message}`, { where: this.url, cause: err, remoteCode }));
      };
      const timer = setTimeout(
        () => done(new EdgeError('TANDEM_EDGE_CONNECT_FAILED', `no connection within ${this.options.connectTimeoutMs} ms`, { where: this.urls.join(',') })),
        timeoutMs,
      );
      socket.on('connect', onConnect);
      socket.on('connect_error', onError);
    });
  }

  /** The URL of the gateway the socket is (or is being) connected to. */
  get currentUrl(): string {
    return this.urls[this.urlIndex];
  }

  private get url(): string {
    return (this.socket.io as unknown as { uri?: string }).uri ?? '';
  }

  /**
   * Sends `env` and returns the reply envelope. Timeouts and lost connections are retried
   * with backoff; an Error reply is thrown as TANDEM_EDGE_REMOTE_ERROR with the cloud's code.
   */
  async request(env: Envelope, options: RequestOptions = {}): Promise<Envelope> {
    const bytes = encodeEnvelope(env);
    const retries = options.retries ?? this.options.retries;
    this.stats.requests += 1;
    const inFlight = this.begin(env.requestId);
    try {
      return await this.sendWithRetries(env, bytes, retries, options, inFlight);
    } finally {
      this.end(env.requestId, inFlight);
    }
  }

  /** Marks `requestId` as in flight: from now its reply stream may be pushed. */
  private begin(requestId: string): InFlight {
    let inFlight = this.inFlight.get(requestId);
    if (inFlight === undefined) {
      inFlight = { requests: 0, streams: new Set([replyStreamId(requestId)]) };
      this.inFlight.set(requestId, inFlight);
    }
    inFlight.requests += 1;
    return inFlight;
  }

  /** The request is answered, failed or out of sends: what its reply streams hold is dropped. */
  private end(requestId: string, inFlight: InFlight): void {
    inFlight.requests -= 1;
    if (inFlight.requests > 0) return;
    this.inFlight.delete(requestId);
    for (const streamId of inFlight.streams) {
      try {
        this.reassembler.close(streamId);
      } catch {
        // incomplete: nobody waits for it any more
      }
    }
  }

  private async sendWithRetries(env: Envelope, bytes: Uint8Array, retries: number, options: RequestOptions, inFlight: InFlight): Promise<Envelope> {
    let lastError: unknown;
    for (let attempt = 0; attempt <= retries; attempt++) {
      if (attempt > 0) {
        this.stats.retries += 1;
        await sleep(Math.min(this.options.maxBackoffMs, this.options.backoffMs * 2 ** (attempt - 1)));
      }
      await this.waitConnected();
      if (!options.beforeReattach) await this.ready;
      if (!this.socket.connected) {
        attempt -= 1; // dropped again while reattaching: wait for the next connection, no send was made
        continue;
      }
      try {
        const reply = await this.send(bytes, env.requestId, inFlight);
        if (reply.body.case === 'error') {
          const { code, message, details } = reply.body.value;
          // The cloud's messages begin with their code; one that does not gets it in front.
          const text = message.startsWith(code) ? message : `${code}: ${message}`;
          if (RETRYABLE_REMOTE.has(code)) {
            lastError = new EdgeError('TANDEM_EDGE_REMOTE_ERROR', text, { remoteCode: code, details });
            continue;
          }
          throw new EdgeError('TANDEM_EDGE_REMOTE_ERROR', text, { remoteCode: code, details, field: env.body.case });
        }
        return reply;
      } catch (err) {
        if (err instanceof EdgeError) throw err;
        lastError = err; // a timeout or a disconnect: resend the same bytes
      }
    }
    throw new EdgeError('TANDEM_EDGE_REQUEST_FAILED', `${env.body.case} got no answer after ${retries + 1} sends: ${(lastError as Error)?.message ?? lastError}`, { field: env.body.case, cause: lastError });
  }

  /** One send of an encoded envelope (as chunks when over the limit); resolves to the decoded reply. */
  private async send(bytes: Uint8Array, requestId: string, inFlight: InFlight): Promise<Envelope> {
    const messages = messagesForTransport(bytes, `${requestId}#${++this.streamCounter}`, this.maxMessageBytes);
    const t0 = performance.now();
    let ack: unknown;
    for (const m of messages) {
      this.stats.bytesSent += m.length;
      ack = await this.socket.timeout(this.options.requestTimeoutMs).emitWithAck('envelope', m);
    }
    const rtt = performance.now() - t0;
    this.rttCount += 1;
    this.stats.lastRttMs = rtt;
    this.stats.meanRttMs += (rtt - this.stats.meanRttMs) / this.rttCount;
    return this.decodeReply(ack, inFlight);
  }

  /**
   * A pushed envelope: the cloud pushes only the leading chunks of a reply too large for one
   * ack, on the reply stream of a request in flight. Anything else is refused before the
   * reassembler sees it, so it holds nothing (a refusal has no caller: it is counted, see refusedPushes).
   */
  private acceptPushed(bytes: unknown): void {
    try {
      const b = toBytes(bytes);
      if (b === undefined) throw new ProtocolError('TANDEM_PROTO_MESSAGE_MALFORMED', { reason: 'a pushed envelope must carry binary bytes' });
      const env = decodeEnvelope(b, { maxMessageBytes: Math.max(this.maxMessageBytes, DEFAULT_LIMITS.maxMessageBytes) });
      if (env.body.case !== 'chunk') throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'envelope.body', reason: `the cloud pushes only reply chunks, not ${env.body.case}` });
      const chunk = env.body.value;
      if (!this.isReplyStreamInFlight(chunk.streamId)) {
        const shown = chunk.streamId.length > REFUSED_ID_CHARS ? `${chunk.streamId.slice(0, REFUSED_ID_CHARS)}…` : chunk.streamId;
        throw new ProtocolError('TANDEM_PROTO_CHUNK_INVALID', { streamId: shown, index: chunk.index, reason: 'no request in flight is answered on this stream' });
      }
      // A resent request's reply starts over: forget what remains of the earlier one.
      if (chunk.index === 0 && this.reassembler.openStreams.includes(chunk.streamId)) {
        try {
          this.reassembler.close(chunk.streamId);
        } catch {
          // incomplete, as expected
        }
      }
      if (this.reassembler.accept(chunk) !== null) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_INVALID', { streamId: chunk.streamId, index: chunk.index, reason: 'the last chunk of a reply comes in its ack, not pushed' });
      }
    } catch (err) {
      // A bad chunk of a real reply also fails that reply when the ack arrives (the stream is incomplete).
      this.refusedPushCount += 1;
      this.lastRefusedPush = err instanceof ProtocolError ? err : new ProtocolError('TANDEM_PROTO_MESSAGE_MALFORMED', { reason: String(err) }, { cause: err });
    }
  }

  private isReplyStreamInFlight(streamId: string): boolean {
    for (const inFlight of this.inFlight.values()) if (inFlight.streams.has(streamId)) return true;
    return false;
  }

  /** Pushed envelopes refused so far, and the last refusal. */
  get refusedPushes(): { count: number; last: ProtocolError | undefined } {
    return { count: this.refusedPushCount, last: this.lastRefusedPush };
  }

  /** What the reply reassembler holds now. */
  get reassembly(): ReassemblyState {
    return { openStreams: this.reassembler.openStreams.length, heldBytes: this.reassembler.heldBytes };
  }

  /** The ack of one send; the chunk streams it names are the request's, dropped when it ends. */
  private decodeReply(ack: unknown, inFlight: InFlight): Envelope {
    const parts = Array.isArray(ack) ? ack.map(toBytes) : [toBytes(ack)];
    if (parts.length === 0 || parts.some((p) => p === undefined)) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the ack carries no envelope bytes', { field: 'ack' });
    }
    let whole: Uint8Array | null = null;
    for (const p of parts as Uint8Array[]) {
      this.stats.bytesReceived += p.length;
      const env = decodeEnvelope(p, { maxMessageBytes: Math.max(this.maxMessageBytes, DEFAULT_LIMITS.maxMessageBytes) });
      if (env.body.case !== 'chunk') return env;
      inFlight.streams.add(env.body.value.streamId);
      whole = this.reassembler.accept(env.body.value);
    }
    if (whole === null) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the reply chunks do not complete a message', { field: 'ack' });
    return decodeEnvelope(whole, { maxMessageBytes: DEFAULT_LIMITS.maxFrameBytes });
  }

  /** A message that needs no reply (SessionClose): sent once, its ack awaited briefly. */
  async notify(env: Envelope, timeoutMs = 2_000): Promise<void> {
    if (!this.socket.connected) return;
    const bytes = encodeEnvelope(env);
    this.stats.bytesSent += bytes.length;
    await this.socket
      .timeout(timeoutMs)
      .emitWithAck('envelope', bytes)
      .catch(() => undefined);
  }

  close(): void {
    this.closed = true;
    this.socket.removeAllListeners();
    this.socket.disconnect();
  }
}
