// f32: the raw little-endian float32 bytes. Exact.
import { bytesOf, emptyParams, expectBytes, firstNonFinite } from './codec.ts';
import type { TensorCodec } from './codec.ts';

export const f32Codec: TensorCodec = {
  name: 'f32',
  encode(data) {
    return { payload: bytesOf(data), params: emptyParams() };
  },
  checkSizes(frame, elements, field) {
    expectBytes(frame, `${field}.payload`, frame.payload.length, elements * 4);
  },
  decodeInto(frame, out) {
    new Uint8Array(out.buffer, out.byteOffset, out.byteLength).set(frame.payload);
  },
  findNonFinite(_frame, out) {
    return firstNonFinite(out);
  },
};

