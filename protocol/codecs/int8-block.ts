// int8-block: blockwise absmax. Per block of `blockSize` elements, scale = absmax / 127
// (float32) and q = round(x / scale) in [-127, 127]; x' = q * scale.
// |x - x'| <= scale / 2 + 2^-24 |x'| (the second term is float32 rounding of the product).
//
// Speed: whole blocks of a multiple of 16 elements go through the WebAssembly SIMD kernel
// (simd/int8-block.wat: round half to even); the rest through the JS loops below, which
// round half up. Both keep the bound above. In the JS loops, the absmax pass reads the float bits as int32 (abs is a mask, max is branchless
// integer arithmetic, and NaN/infinity show up as bits >= 0x7f800000 for free); the
// quantize pass rounds without Math.round: x / scale + 128.5 is in [1, 256), so truncating
// to an integer (which |, << do anyway) gives q + 128, and XOR 0x80 turns that byte into q's
// two's complement. Four int8 are written at a time as one little-endian int32.
import { checkFrameBlockSize, blockSizeOf, bytesOf, expectBytes, float32sOf, alignedBytes, firstBadScale, nonFiniteInput } from './codec.ts';
import type { TensorCodec } from './codec.ts';
import { int8Kernel } from './simd/int8-kernel.ts';

// q + 128 + 0.5: truncation then rounds half up, on a positive number.
const BIAS = 128.5;
const NON_FINITE_BITS = 0x7f800000;

const scratchF32 = new Float32Array(1);
const scratchI32 = new Int32Array(scratchF32.buffer);

function floatOfBits(bits: number): number {
  scratchI32[0] = bits;
  return scratchF32[0];
}

/** Largest |x| bits over [from, to), as an int32; >= 0x7f800000 means a NaN or infinity is there. */
function absmaxBits(xi: Int32Array, from: number, to: number): number {
  let m0 = 0;
  let m1 = 0;
  let i = from;
  for (; i + 1 < to; i += 2) {
    const a = xi[i] & 0x7fffffff;
    const b = xi[i + 1] & 0x7fffffff;
    m0 -= (m0 - a) & ((m0 - a) >> 31);
    m1 -= (m1 - b) & ((m1 - b) >> 31);
  }
  if (i < to) {
    const a = xi[i] & 0x7fffffff;
    if (a > m0) m0 = a;
  }
  return m0 > m1 ? m0 : m1;
}

function firstNonFiniteIn(x: Float32Array, from: number, to: number): number {
  for (let i = from; i < to; i++) if (x[i] - x[i] !== 0) return i;
  return from;
}

/**
 * Quantizes `x` block by block into `q` (its buffer holds at least x.length rounded up to 4
 * bytes, at offset 0) and `scales`, with `qmax` 127 for int8 or 7 for int4.
 */
export function quantizeBlocks(x: Float32Array, blockSize: number, qmax: number, q: Int8Array, scales: Float32Array): void {
  const n = x.length;
  // int8 with whole 16-lane blocks: the WebAssembly SIMD kernel for the whole blocks, JS for the tail.
  const simd = qmax === 127 && blockSize % 16 === 0 ? int8Kernel() : undefined;
  if (simd && n >= blockSize) {
    const whole = n - (n % blockSize);
    const bad = simd.quantize(x.subarray(0, whole), blockSize, q, scales);
    if (bad >= 0) throw nonFiniteInput(firstNonFiniteIn(x, bad * blockSize, (bad + 1) * blockSize));
    if (whole < n) quantizeTail(x, whole, blockSize, qmax, q, scales);
    return;
  }
  quantizeBlocksScalar(x, blockSize, qmax, q, scales);
}

/** The plain JS quantization (any block size, int8 or int4 range). */
export function quantizeBlocksScalar(x: Float32Array, blockSize: number, qmax: number, q: Int8Array, scales: Float32Array): void {
  const n = x.length;
  const xi = new Int32Array(x.buffer, x.byteOffset, n);
  const fullBlocks = Math.floor(n / blockSize);
  const packed = blockSize % 4 === 0 && q.byteOffset === 0;
  const q32 = new Int32Array(q.buffer, 0, q.buffer.byteLength >> 2);
  for (let b = 0; b < fullBlocks; b++) {
    const s = b * blockSize;
    const e = s + blockSize;
    const bits = absmaxBits(xi, s, e);
    if (bits >= NON_FINITE_BITS) throw nonFiniteInput(firstNonFiniteIn(x, s, e));
    scales[b] = floatOfBits(bits) / qmax;
    const scale = scales[b];
    const inv = scale > 0 ? 1 / scale : 0;
    if (packed) {
      for (let i = s; i < e; i += 4) {
        q32[i >> 2] = ((x[i] * inv + BIAS) | ((x[i + 1] * inv + BIAS) << 8) | ((x[i + 2] * inv + BIAS) << 16) | ((x[i + 3] * inv + BIAS) << 24)) ^ 0x80808080;
      }
    } else {
      for (let i = s; i < e; i++) q[i] = ((x[i] * inv + BIAS) | 0) - 128;
    }
  }
  if (fullBlocks * blockSize < n) quantizeTail(x, fullBlocks * blockSize, blockSize, qmax, q, scales);
}

/** The last, partial block starting at `s`. */
function quantizeTail(x: Float32Array, s: number, blockSize: number, qmax: number, q: Int8Array, scales: Float32Array): void {
  const n = x.length;
  const xi = new Int32Array(x.buffer, x.byteOffset, n);
  const b = s / blockSize;
  const bits = absmaxBits(xi, s, n);
  if (bits >= NON_FINITE_BITS) throw nonFiniteInput(firstNonFiniteIn(x, s, n));
  scales[b] = floatOfBits(bits) / qmax;
  const scale = scales[b];
  const inv = scale > 0 ? 1 / scale : 0;
  for (let i = s; i < n; i++) q[i] = ((x[i] * inv + BIAS) | 0) - 128;
}

/** x' = q * scale per block. `q` must start at a 4-byte aligned offset for the fast path. */
export function dequantizeInt8Blocks(q: Int8Array, scales: Float32Array, blockSize: number, out: Float32Array): void {
  const n = out.length;
  const fullBlocks = Math.floor(n / blockSize);
  const simd = blockSize % 16 === 0 && fullBlocks > 0 ? int8Kernel() : undefined;
  if (simd) {
    const whole = fullBlocks * blockSize;
    simd.dequantize(q, scales, blockSize, out.subarray(0, whole));
    for (let i = whole; i < n; i++) out[i] = q[i] * scales[fullBlocks];
    return;
  }
  dequantizeInt8BlocksScalar(q, scales, blockSize, out);
}

/** The plain JS dequantization. */
export function dequantizeInt8BlocksScalar(q: Int8Array, scales: Float32Array, blockSize: number, out: Float32Array): void {
  const n = out.length;
  const fullBlocks = Math.floor(n / blockSize);
  const packed = blockSize % 4 === 0 && q.byteOffset % 4 === 0;
  const q32 = new Int32Array(q.buffer, q.byteOffset, n >> 2);
  let b = 0;
  if (packed) {
    for (; b < fullBlocks; b++) {
      const s = b * blockSize;
      const e = s + blockSize;
      const scale = scales[b];
      for (let i = s; i < e; i += 4) {
        const w = q32[i >> 2];
        out[i] = ((w << 24) >> 24) * scale;
        out[i + 1] = ((w << 16) >> 24) * scale;
        out[i + 2] = ((w << 8) >> 24) * scale;
        out[i + 3] = (w >> 24) * scale;
      }
    }
  }
  for (; b * blockSize < n; b++) {
    const s = b * blockSize;
    const e = Math.min(s + blockSize, n);
    const scale = scales[b];
    for (let i = s; i < e; i++) out[i] = q[i] * scale;
  }
}

export function blockCount(elements: number, blockSize: number): number {
  return Math.ceil(elements / blockSize);
}

export const int8BlockCodec: TensorCodec = {
  name: 'int8-block',
  encode(data, spec) {
    const blockSize = blockSizeOf(spec);
    const n = data.length;
    const q = new Int8Array(new ArrayBuffer((n + 3) & ~3), 0, n);
    const scales = new Float32Array(blockCount(n, blockSize));
    quantizeBlocks(data, blockSize, 127, q, scales);
    return {
      payload: bytesOf(q),
      params: { blockSize, scales: bytesOf(scales), k: 0, topkValues: null, indices: new Uint8Array(0) },
    };
  },
  checkSizes(frame, elements, field) {
    const blockSize = checkFrameBlockSize(frame, field);
    expectBytes(frame, `${field}.payload`, frame.payload.length, elements);
    expectBytes(frame, `${field}.params.scales`, frame.params.scales.length, blockCount(elements, blockSize) * 4);
  },
  decodeInto(frame, out) {
    const payload = alignedBytes(frame.payload, 4);
    const q = new Int8Array(payload.buffer, payload.byteOffset, payload.length);
    dequantizeInt8Blocks(q, float32sOf(frame.params.scales), frame.params.blockSize, out);
  },
  findNonFinite(frame) {
    const bad = firstBadScale(float32sOf(frame.params.scales), 127);
    return bad < 0 ? -1 : bad * frame.params.blockSize;
  },
};
