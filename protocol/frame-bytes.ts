// One TensorFrame to bytes and back, outside an envelope, in the protocol's own encoding: how a
// gateway hands the frame an edge sent to a cluster worker as it came (an int8-block h_B is a
// quarter of its float32 values), for the worker to decode into the very values the gateway
// decoded. Decoding takes untrusted bytes and throws nothing but ProtocolError; the frame is
// checked against the limits, its codec's sizes and its checksum by validateFrame, as any
// received frame is, before anything is decoded.
import { asProtocolError, ProtocolError } from './errors.ts';
import type { TensorFrame } from './messages.ts';
import { wireTypes } from './schema.ts';
import { checkDecodedValues } from './wire-scan.ts';
import { frameFromWire, frameToWire } from './wire.ts';

export function encodeFrame(frame: TensorFrame): Uint8Array {
  try {
    const bytes = wireTypes.TensorFrame.encode(frameToWire(frame)).finish();
    return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
  } catch (error) {
    throw asProtocolError(error, 'TANDEM_PROTO_INPUT_INVALID', { field: frame.name || 'frame' });
  }
}

/** The frame in `bytes`, refused over `maxBytes` before it is parsed; `field` names it in errors. */
export function decodeFrame(bytes: Uint8Array, maxBytes: number, field = 'frame'): TensorFrame {
  if (bytes.length > maxBytes) throw new ProtocolError('TANDEM_PROTO_MESSAGE_TOO_LARGE', { actual: bytes.length, limit: maxBytes });
  checkDecodedValues(wireTypes.TensorFrame, bytes);
  try {
    return frameFromWire(wireTypes.TensorFrame.decode(bytes) as unknown as Parameters<typeof frameFromWire>[0], field);
  } catch (error) {
    throw asProtocolError(error, 'TANDEM_PROTO_MESSAGE_MALFORMED');
  }
}
