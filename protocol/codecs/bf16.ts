// bf16: the upper 16 bits of float32, rounded to nearest even; 2 bytes per element,
// little-endian. |error| <= 2^-8 |x| for normal x; NaN stays NaN.
import { bytesOf, emptyParams, expectBytes, uint16sOf } from './codec.ts';
import type { TensorCodec } from './codec.ts';

export const bf16Codec: TensorCodec = {
  name: 'bf16',
  encode(data) {
    // Int32, not Uint32: V8 keeps int32 loads in registers, while a uint32 above 2^31 becomes a double.
    const bits = new Int32Array(data.buffer, data.byteOffset, data.length);
    const out = new Uint16Array(data.length);
    for (let i = 0; i < bits.length; i++) {
      const u = bits[i];
      // A NaN must stay a NaN: rounding could carry its payload into an infinity. The rounding
      // sum stays within int32 for every non-NaN u.
      out[i] = (u & 0x7fffffff) > 0x7f800000 ? (u >>> 16) | 0x40 : (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
    }
    return { payload: bytesOf(out), params: emptyParams() };
  },
  checkSizes(frame, elements, field) {
    expectBytes(frame, `${field}.payload`, frame.payload.length, elements * 2);
  },
  decodeInto(frame, out) {
    const halves = uint16sOf(frame.payload);
    const words = new Int32Array(out.buffer, out.byteOffset, out.length);
    for (let i = 0; i < halves.length; i++) words[i] = halves[i] << 16;
  },
  findNonFinite(frame) {
    const halves = uint16sOf(frame.payload);
    for (let i = 0; i < halves.length; i++) if ((halves[i] & 0x7f80) === 0x7f80) return i;
    return -1;
  },
};
