// Reassembles chunked messages. Chunks of a stream must arrive in order (the transport is
// ordered, so a gap means a chunk was lost). Memory is bounded by the number of open
// streams and the totals they declare, and only what has arrived is held: nothing is
// reserved up front, so a stream that declares a large total and stops costs its chunks,
// not its total, and is dropped after the stream timeout. A ReassemblyBudget shared by
// every reassembler of a process caps the bytes being reassembled all together.
import { crc32 } from './crc32.ts';
import { ProtocolError } from './errors.ts';
import { DEFAULT_LIMITS } from './limits.ts';
import type { Chunk } from './messages.ts';

/**
 * Bytes held by incomplete streams, across every Reassembler that shares it. A budget may have
 * a parent (a tenant's share of the node's): a take must fit both.
 */
export class ReassemblyBudget {
  readonly limit: number;
  /** What the budget caps, for the refusal ("bytes being reassembled on this node"). */
  readonly name: string;
  readonly parent: ReassemblyBudget | undefined;
  #used = 0;

  constructor(limit: number, options: { name?: string; parent?: ReassemblyBudget } = {}) {
    this.limit = limit;
    this.name = options.name ?? 'bytes being reassembled on this node';
    this.parent = options.parent;
  }

  get used(): number {
    return this.#used;
  }

  /** Takes `bytes` from this budget and its parents; nothing is taken and the budget that refused is returned when they would pass one's limit. */
  take(bytes: number): ReassemblyBudget | undefined {
    if (this.#used + bytes > this.limit) return this;
    const refused = this.parent?.take(bytes);
    if (refused !== undefined) return refused;
    this.#used += bytes;
    return undefined;
  }

  give(bytes: number): void {
    this.#used = Math.max(0, this.#used - bytes);
    this.parent?.give(bytes);
  }
}

/** Longest stream id: a request id (at most 256 characters on the data plane) and a suffix. */
export const MAX_STREAM_ID_CHARS = 320;

export interface ReassemblerOptions {
  /** Largest message one stream may assemble. */
  maxMessageBytes?: number;
  /** Bytes all open streams of this reassembler may declare together. */
  maxTotalBytes?: number;
  maxOpenStreams?: number;
  /** Shared cap on the bytes held by incomplete streams (of this and other reassemblers). */
  budget?: ReassemblyBudget;
  /** A stream with no chunk for this long is dropped (expire(), and on the next accept()). */
  streamTimeoutMs?: number;
  now?: () => number;
}

interface OpenStream {
  count: number;
  totalBytes: number;
  next: number;
  filled: number;
  /** Taken from the budget for the chunks held: their bytes and HELD_CHUNK_OVERHEAD_BYTES each. */
  charged: number;
  parts: Uint8Array[];
  lastChunkAt: number;
}

/**
 * What holding one chunk costs beyond its bytes (its own Uint8Array and ArrayBuffer), charged
 * to the budget with them: 1-byte chunks held about 220 bytes of memory each, so a stream of
 * them held two orders of magnitude more than the budget counted.
 */
export const HELD_CHUNK_OVERHEAD_BYTES = 256;

/** Stream ids remembered after their timeout, so that a late chunk is told why. */
const TIMED_OUT_REMEMBERED = 64;

export class Reassembler {
  readonly #maxMessageBytes: number;
  readonly #maxTotalBytes: number;
  readonly #maxOpenStreams: number;
  readonly #budget: ReassemblyBudget | undefined;
  readonly #timeoutMs: number;
  readonly #now: () => number;
  readonly #streams = new Map<string, OpenStream>();
  readonly #timedOut = new Set<string>();
  #reserved = 0;

  constructor(options: ReassemblerOptions = {}) {
    this.#maxMessageBytes = options.maxMessageBytes ?? DEFAULT_LIMITS.maxFrameBytes;
    this.#maxTotalBytes = options.maxTotalBytes ?? 2 * this.#maxMessageBytes;
    this.#maxOpenStreams = options.maxOpenStreams ?? 16;
    this.#budget = options.budget;
    this.#timeoutMs = options.streamTimeoutMs ?? Infinity;
    this.#now = options.now ?? Date.now;
  }

  /** Adds a chunk; returns the whole message when this chunk completes it, else null. */
  accept(chunk: Chunk): Uint8Array | null {
    const { streamId, index, count, totalBytes, data } = chunk;
    const fail = (reason: string): ProtocolError => new ProtocolError('TANDEM_PROTO_CHUNK_INVALID', { streamId, index, reason });
    this.expire();
    if (streamId.length > MAX_STREAM_ID_CHARS) throw new ProtocolError('TANDEM_PROTO_CHUNK_INVALID', { streamId: `${streamId.slice(0, 32)}…`, index, reason: `the stream id has ${streamId.length} characters, over the limit of ${MAX_STREAM_ID_CHARS}` });
    if (count < 1 || index >= count) throw fail(`index ${index} is outside count ${count}`);
    if (crc32(data) !== chunk.crc32) throw fail('crc32 does not match its data');
    let stream = this.#streams.get(streamId);
    if (stream === undefined) {
      if (index !== 0) {
        if (this.#timedOut.has(streamId)) throw new ProtocolError('TANDEM_PROTO_CHUNK_TIMEOUT', { streamId, timeoutMs: this.#timeoutMs });
        throw new ProtocolError('TANDEM_PROTO_CHUNK_OUT_OF_ORDER', { streamId, index, expected: 0 });
      }
      if (totalBytes > this.#maxMessageBytes) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'message bytes', actual: totalBytes, limit: this.#maxMessageBytes });
      }
      if (count > Math.max(1, totalBytes)) throw fail(`${count} chunks cannot each carry data of ${totalBytes} bytes`);
      if (this.#streams.size >= this.#maxOpenStreams) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'open streams', actual: this.#streams.size + 1, limit: this.#maxOpenStreams });
      }
      if (this.#reserved + totalBytes > this.#maxTotalBytes) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'declared bytes', actual: this.#reserved + totalBytes, limit: this.#maxTotalBytes });
      }
      this.#timedOut.delete(streamId);
      stream = { count, totalBytes, next: 0, filled: 0, charged: 0, parts: [], lastChunkAt: this.#now() };
      this.#streams.set(streamId, stream);
      this.#reserved += totalBytes;
    } else {
      if (index < stream.next) throw new ProtocolError('TANDEM_PROTO_CHUNK_DUPLICATE', { streamId, index });
      if (index > stream.next) {
        this.#drop(streamId);
        throw new ProtocolError('TANDEM_PROTO_CHUNK_OUT_OF_ORDER', { streamId, index, expected: stream.next });
      }
      if (count !== stream.count || totalBytes !== stream.totalBytes) {
        this.#drop(streamId);
        throw fail(`count ${count} and total ${totalBytes} differ from the stream's ${stream.count} and ${stream.totalBytes}`);
      }
    }
    if (stream.filled + data.length > stream.totalBytes) {
      this.#drop(streamId);
      throw fail(`data runs past the total of ${stream.totalBytes} bytes`);
    }
    const last = stream.next + 1 === stream.count;
    // The last chunk is copied straight into the whole message: only incomplete streams hold budget.
    const charge = last ? 0 : data.length + HELD_CHUNK_OVERHEAD_BYTES;
    const refused = last ? undefined : this.#budget?.take(charge);
    if (refused !== undefined) {
      const used = refused.used;
      this.#drop(streamId);
      throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: refused.name, actual: used + charge, limit: refused.limit });
    }
    stream.charged += charge;
    // A copy: `data` is a view into the whole received envelope, which a small chunk would keep alive.
    stream.parts.push(last ? data : data.slice());
    stream.filled += data.length;
    stream.next++;
    stream.lastChunkAt = this.#now();
    if (!last) return null;
    this.#drop(streamId);
    if (stream.filled !== stream.totalBytes) throw fail(`the chunks carry ${stream.filled} of ${stream.totalBytes} bytes`);
    const whole = new Uint8Array(stream.totalBytes);
    let at = 0;
    for (const part of stream.parts) {
      whole.set(part, at);
      at += part.length;
    }
    return whole;
  }

  /** Ends a stream, e.g. on a timeout or a disconnect; a typed error when it was still incomplete. */
  close(streamId: string): void {
    const stream = this.#streams.get(streamId);
    if (stream === undefined) return;
    this.#drop(streamId);
    throw new ProtocolError('TANDEM_PROTO_CHUNK_MISSING', { streamId, received: stream.next, count: stream.count });
  }

  /** Drops the streams that had no chunk within the stream timeout; returns their ids. */
  expire(): string[] {
    if (!Number.isFinite(this.#timeoutMs)) return [];
    const now = this.#now();
    const expired: string[] = [];
    for (const [streamId, stream] of this.#streams) {
      if (now - stream.lastChunkAt <= this.#timeoutMs) continue;
      this.#drop(streamId);
      expired.push(streamId);
      this.#timedOut.add(streamId);
      if (this.#timedOut.size > TIMED_OUT_REMEMBERED) this.#timedOut.delete(this.#timedOut.values().next().value as string);
    }
    return expired;
  }

  get openStreams(): string[] {
    return [...this.#streams.keys()];
  }

  /** Bytes the open streams declare (their totals). */
  get reservedBytes(): number {
    return this.#reserved;
  }

  /** Bytes the open streams hold. */
  get heldBytes(): number {
    let held = 0;
    for (const stream of this.#streams.values()) held += stream.filled;
    return held;
  }

  #drop(streamId: string): void {
    const stream = this.#streams.get(streamId);
    if (stream === undefined) return;
    this.#streams.delete(streamId);
    this.#reserved -= stream.totalBytes;
    this.#budget?.give(stream.charged);
  }
}
