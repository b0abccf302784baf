// What every tensor codec implements, and helpers they share.
import { ProtocolError } from '../errors.ts';
import type { CodecName, CodecParams, CodecSpec, TensorFrame } from '../messages.ts';

export interface EncodedTensor {
  payload: Uint8Array;
  params: CodecParams;
}

export interface EncodeContext {
  /** Let NaN and infinities through where the codec can carry them. */
  allowNonFinite: boolean;
}

export interface TensorCodec {
  readonly name: CodecName;
  encode(data: Float32Array, spec: CodecSpec, context: EncodeContext): EncodedTensor;
  /** Throws a typed error when the frame's byte sizes do not fit `elements`. Runs before anything is allocated. */
  checkSizes(frame: TensorFrame, elements: number, field: string): void;
  /** `out` is zero-filled and has the frame's element count. */
  decodeInto(frame: TensorFrame, out: Float32Array, field: string): void;
  /** Index of the first element that decodes to NaN or an infinity, or -1. */
  findNonFinite(frame: TensorFrame, out: Float32Array): number;
}

export const DEFAULT_BLOCK_SIZE = 64;
export const MAX_BLOCK_SIZE = 1 << 16;

export function emptyParams(): CodecParams {
  return { blockSize: 0, scales: new Uint8Array(0), k: 0, topkValues: null, indices: new Uint8Array(0) };
}

export function blockSizeOf(spec: CodecSpec): number {
  const size = spec.blockSize || DEFAULT_BLOCK_SIZE;
  if (!Number.isInteger(size) || size < 1 || size > MAX_BLOCK_SIZE) {
    throw new ProtocolError('TANDEM_PROTO_CODEC_PARAMS_INVALID', { field: 'blockSize', reason: `${size} is not an integer in [1, ${MAX_BLOCK_SIZE}]` });
  }
  return size;
}

export function checkFrameBlockSize(frame: TensorFrame, field: string): number {
  const size = frame.params.blockSize;
  if (size < 1 || size > MAX_BLOCK_SIZE) {
    throw new ProtocolError('TANDEM_PROTO_CODEC_PARAMS_INVALID', { field: `${field}.params.block_size`, reason: `${size} is not in [1, ${MAX_BLOCK_SIZE}]` });
  }
  return size;
}

export function expectBytes(frame: TensorFrame, field: string, actual: number, expected: number): void {
  if (actual !== expected) {
    throw new ProtocolError('TANDEM_PROTO_FRAME_SIZE_MISMATCH', { field, actual, expected, codec: frame.codec });
  }
}

// Typed-array views need aligned offsets; bytes decoded from a message can sit anywhere,
// in which case they are copied once (not with slice(): on a Buffer it is a view).
export function alignedBytes(bytes: Uint8Array, alignment: number): Uint8Array {
  return bytes.byteOffset % alignment === 0 ? bytes : new Uint8Array(bytes);
}

export function float32sOf(bytes: Uint8Array): Float32Array {
  const b = alignedBytes(bytes, 4);
  return new Float32Array(b.buffer, b.byteOffset, b.length >> 2);
}

export function uint16sOf(bytes: Uint8Array): Uint16Array {
  const b = alignedBytes(bytes, 2);
  return new Uint16Array(b.buffer, b.byteOffset, b.length >> 1);
}

export function bytesOf(view: ArrayBufferView, length = view.byteLength): Uint8Array {
  return new Uint8Array(view.buffer, view.byteOffset, length);
}

/** -1, or the first index whose value is NaN or infinite. */
export function firstNonFinite(values: Float32Array): number {
  const bits = new Int32Array(values.buffer, values.byteOffset, values.length);
  const n = bits.length;
  for (let s = 0; s < n; s += 1024) {
    const e = Math.min(s + 1024, n);
    // Branch-free over a chunk: an all-ones exponent (NaN, infinity) carries into the sign bit.
    let found = 0;
    for (let i = s; i < e; i++) found |= ((bits[i] & 0x7f800000) + 0x00800000) & 0x80000000;
    if (found !== 0) {
      for (let i = s; i < e; i++) if ((bits[i] & 0x7f800000) === 0x7f800000) return i;
    }
  }
  return -1;
}

/** -1, or the first block whose scale is not finite or would overflow float32 at `qmax`. */
export function firstBadScale(scales: Float32Array, qmax: number): number {
  for (let b = 0; b < scales.length; b++) {
    const v = Math.fround(scales[b] * qmax);
    if (v - v !== 0) return b;
  }
  return -1;
}

export function nonFiniteInput(index: number): ProtocolError {
  return new ProtocolError('TANDEM_PROTO_FRAME_NON_FINITE', { field: 'input', index });
}
