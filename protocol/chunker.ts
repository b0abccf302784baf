// Splits an encoded envelope that is larger than the transport's message limit into
// Chunk envelopes, each within the limit. The Reassembler puts them back together.
import { crc32 } from './crc32.ts';
import { ProtocolError } from './errors.ts';
import { encodeEnvelope, envelope } from './envelope.ts';

// Worst-case growth of a Chunk envelope once data is added: the data field's tag and a
// 5-byte length, plus 4 more bytes in the length prefix of the chunk body itself.
const DATA_FIELD_OVERHEAD = 1 + 5 + 4;

function chunkOverhead(streamId: string, count: number, totalBytes: number): number {
  const header = encodeEnvelope(envelope(streamId, {
    case: 'chunk',
    value: { streamId, index: count - 1, count, totalBytes, crc32: 0xffffffff, data: new Uint8Array(0) },
  }));
  return header.length + DATA_FIELD_OVERHEAD;
}

/** Encoded Chunk envelopes carrying `message`, each at most `maxMessageBytes`. */
export function splitMessage(message: Uint8Array, streamId: string, maxMessageBytes: number): Uint8Array[] {
  // The count is not known before the overhead, which depends on the count: bound it by the largest.
  const overhead = chunkOverhead(streamId, Math.max(1, message.length), message.length);
  const room = maxMessageBytes - overhead;
  if (room < 1) {
    throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: 'maxMessageBytes', reason: `${maxMessageBytes} leaves no room for chunk data after ${overhead} bytes of header` });
  }
  const count = Math.max(1, Math.ceil(message.length / room));
  const chunks: Uint8Array[] = [];
  for (let index = 0; index < count; index++) {
    const data = message.subarray(index * room, Math.min(message.length, (index + 1) * room));
    chunks.push(encodeEnvelope(envelope(streamId, {
      case: 'chunk',
      value: { streamId, index, count, totalBytes: message.length, crc32: crc32(data), data },
    })));
  }
  return chunks;
}

/** The messages to send for `message`: itself when it fits, otherwise its chunks. */
export function messagesForTransport(message: Uint8Array, streamId: string, maxMessageBytes: number): Uint8Array[] {
  return message.length <= maxMessageBytes ? [message] : splitMessage(message, streamId, maxMessageBytes);
}
