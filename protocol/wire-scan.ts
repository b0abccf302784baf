// Counts what protobuf bytes would decode into, walking them with the message's type, before
// protobufjs builds anything. protobufjs makes an object for every field it reads and an array
// entry for every repeated element: a 4 MiB Forward of two-byte empty frames is two million
// objects (seconds of the event loop, hundreds of MB), and a packed `shape` of four million
// entries is a 32 MB array. This walk allocates nothing and costs one pass over the tags (the
// bytes of tensors and strings are stepped over, packed varints are counted byte by byte).
import type protobuf from 'protobufjs';
import { ProtocolError } from './errors.ts';

/** Fields and repeated elements one envelope may decode into (a held adapter's export of 500 frames is a few thousand). */
export const MAX_DECODED_VALUES = 65_536;
/** Messages nested in messages; the schema nests a few levels. */
export const MAX_NESTING = 16;

const VARINT_TYPES = new Set(['int32', 'uint32', 'sint32', 'int64', 'uint64', 'sint64', 'bool', 'enum']);
const FIXED32_TYPES = new Set(['fixed32', 'sfixed32', 'float']);
const FIXED64_TYPES = new Set(['fixed64', 'sfixed64', 'double']);

function malformed(reason: string): ProtocolError {
  return new ProtocolError('TANDEM_PROTO_MESSAGE_MALFORMED', { reason });
}

/**
 * Throws TANDEM_PROTO_MESSAGE_VALUES_EXCEEDED when `bytes`, read as `type`, would decode into
 * more than `limit` values, and TANDEM_PROTO_MESSAGE_MALFORMED when they cannot be walked.
 */
export function checkDecodedValues(type: protobuf.Type, bytes: Uint8Array, limit = MAX_DECODED_VALUES): number {
  let values = 0;
  const count = (n: number): void => {
    values += n;
    if (values > limit) throw new ProtocolError('TANDEM_PROTO_MESSAGE_VALUES_EXCEEDED', { actual: values, limit });
  };
  let at = 0;
  const varint = (end: number): number => {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (at >= end) throw malformed('a varint runs past its message');
      const b = bytes[at++];
      if (i < 7) result += (b & 0x7f) * scale; // lengths and tags fit in 49 bits; larger ones only need skipping
      scale *= 128;
      if ((b & 0x80) === 0) return result;
    }
    throw malformed('a varint is longer than 10 bytes');
  };
  const walk = (t: protobuf.Type | undefined, end: number, depth: number): void => {
    if (depth > MAX_NESTING) throw malformed(`messages nest deeper than ${MAX_NESTING}`);
    while (at < end) {
      const tag = varint(end);
      const wire = tag % 8;
      const field = t?.fieldsById[Math.floor(tag / 8)];
      count(1);
      switch (wire) {
        case 0:
          varint(end);
          break;
        case 1:
        case 5:
          at += wire === 1 ? 8 : 4;
          if (at > end) throw malformed('a fixed-width field runs past its message');
          break;
        case 2: {
          const length = varint(end);
          if (length > end - at) throw malformed('a length-delimited field runs past its message');
          const stop = at + length;
          const resolved = field?.resolvedType ?? null;
          const message = resolved !== null && 'fieldsById' in resolved;
          if (field !== undefined && !field.map && message) {
            walk(resolved, stop, depth + 1);
          } else if (field?.repeated && !field.map) {
            // Packed scalars: one value per varint, or per 4 or 8 bytes.
            const scalar = resolved !== null ? 'enum' : field.type;
            if (VARINT_TYPES.has(scalar)) {
              let elements = 0;
              for (let i = at; i < stop; i++) if ((bytes[i] & 0x80) === 0) elements++;
              count(elements);
            } else if (FIXED32_TYPES.has(scalar)) count(Math.floor(length / 4));
            else if (FIXED64_TYPES.has(scalar)) count(Math.floor(length / 8));
          }
          at = stop;
          break;
        }
        default:
          // Groups (3, 4) are proto2's and nothing in this schema; protobufjs would skip them to any depth.
          throw malformed(`wire type ${wire} is not read`);
      }
    }
    if (at !== end) throw malformed('a field runs past its message');
  };
  walk(type, bytes.length, 0);
  return values;
}
