// Reassembles chunked messages. Chunks of a stream must arrive in order (the transport is
// ordered, so a gap means a chunk was lost); memory is bounded by the number of open
// streams and the bytes they reserve.
import { crc32 } from './crc32.ts';
import { ProtocolError } from './errors.ts';
import { DEFAULT_LIMITS } from './limits.ts';
import type { Chunk } from './messages.ts';

export interface ReassemblerOptions {
  /** Largest message one stream may assemble. */
  maxMessageBytes?: number;
  /** Bytes all open streams may reserve together. */
  maxTotalBytes?: number;
  maxOpenStreams?: number;
}

interface OpenStream {
  count: number;
  totalBytes: number;
  next: number;
  filled: number;
  buffer: Uint8Array;
}

export class Reassembler {
  readonly #maxMessageBytes: number;
  readonly #maxTotalBytes: number;
  readonly #maxOpenStreams: number;
  readonly #streams = new Map<string, OpenStream>();
  #reserved = 0;

  constructor(options: ReassemblerOptions = {}) {
    this.#maxMessageBytes = options.maxMessageBytes ?? DEFAULT_LIMITS.maxFrameBytes;
    this.#maxTotalBytes = options.maxTotalBytes ?? 2 * this.#maxMessageBytes;
    this.#maxOpenStreams = options.maxOpenStreams ?? 16;
  }

  /** Adds a chunk; returns the whole message when this chunk completes it, else null. */
  accept(chunk: Chunk): Uint8Array | null {
    const { streamId, index, count, totalBytes, data } = chunk;
    const fail = (reason: string): ProtocolError => new ProtocolError('TANDEM_PROTO_CHUNK_INVALID', { streamId, index, reason });
    if (count < 1 || index >= count) throw fail(`index ${index} is outside count ${count}`);
    if (crc32(data) !== chunk.crc32) throw fail('crc32 does not match its data');
    let stream = this.#streams.get(streamId);
    if (stream === undefined) {
      if (index !== 0) throw new ProtocolError('TANDEM_PROTO_CHUNK_OUT_OF_ORDER', { streamId, index, expected: 0 });
      if (totalBytes > this.#maxMessageBytes) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'message bytes', actual: totalBytes, limit: this.#maxMessageBytes });
      }
      if (count > Math.max(1, totalBytes)) throw fail(`${count} chunks cannot each carry data of ${totalBytes} bytes`);
      if (this.#streams.size >= this.#maxOpenStreams) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'open streams', actual: this.#streams.size + 1, limit: this.#maxOpenStreams });
      }
      if (this.#reserved + totalBytes > this.#maxTotalBytes) {
        throw new ProtocolError('TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED', { field: 'reserved bytes', actual: this.#reserved + totalBytes, limit: this.#maxTotalBytes });
      }
      // Allocated only after every limit has passed.
      stream = { count, totalBytes, next: 0, filled: 0, buffer: new Uint8Array(totalBytes) };
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
    stream.buffer.set(data, stream.filled);
    stream.filled += data.length;
    stream.next++;
    if (stream.next < stream.count) return null;
    this.#drop(streamId);
    if (stream.filled !== stream.totalBytes) throw fail(`the chunks carry ${stream.filled} of ${stream.totalBytes} bytes`);
    return stream.buffer;
  }

  /** Ends a stream, e.g. on a timeout or a disconnect; a typed error when it was still incomplete. */
  close(streamId: string): void {
    const stream = this.#streams.get(streamId);
    if (stream === undefined) return;
    this.#drop(streamId);
    throw new ProtocolError('TANDEM_PROTO_CHUNK_MISSING', { streamId, received: stream.next, count: stream.count });
  }

  get openStreams(): string[] {
    return [...this.#streams.keys()];
  }

  get reservedBytes(): number {
    return this.#reserved;
  }

  #drop(streamId: string): void {
    const stream = this.#streams.get(streamId);
    if (stream === undefined) return;
    this.#streams.delete(streamId);
    this.#reserved -= stream.totalBytes;
  }
}
