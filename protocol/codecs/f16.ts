// f16: IEEE binary16, 2 bytes per element, little-endian. |error| <= 2^-11 |x| for
// |x| >= 2^-14, <= 2^-25 below; |x| >= 65520 is out of range.
import { ProtocolError } from '../errors.ts';
import { bytesOf, emptyParams, expectBytes, uint16sOf } from './codec.ts';
import type { TensorCodec } from './codec.ts';
import { f16Table, f32BitsToF16 } from './half.ts';

export function encodeF16(data: Float32Array, allowNonFinite: boolean): Uint16Array {
  // Int32, not Uint32: V8 keeps int32 loads in registers, while a uint32 above 2^31 becomes a double.
  const bits = new Int32Array(data.buffer, data.byteOffset, data.length);
  const out = new Uint16Array(data.length);
  for (let i = 0; i < bits.length; i++) {
    const h = f32BitsToF16(bits[i]);
    if ((h & 0x7c00) === 0x7c00 && !allowNonFinite) {
      throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: `data[${i}]`, reason: `${data[i]} is not finite in f16 (|x| < 65520)` });
    }
    out[i] = h;
  }
  return out;
}

export function decodeF16Into(halves: Uint16Array, out: Float32Array): void {
  const t = f16Table();
  for (let i = 0; i < halves.length; i++) out[i] = t[halves[i]];
}

export function firstNonFiniteF16(halves: Uint16Array): number {
  for (let i = 0; i < halves.length; i++) if ((halves[i] & 0x7c00) === 0x7c00) return i;
  return -1;
}

export const f16Codec: TensorCodec = {
  name: 'f16',
  encode(data, _spec, context) {
    return { payload: bytesOf(encodeF16(data, context.allowNonFinite)), params: emptyParams() };
  },
  checkSizes(frame, elements, field) {
    expectBytes(frame, `${field}.payload`, frame.payload.length, elements * 2);
  },
  decodeInto(frame, out) {
    decodeF16Into(uint16sOf(frame.payload), out);
  },
  findNonFinite(frame) {
    return firstNonFiniteF16(uint16sOf(frame.payload));
  },
};
