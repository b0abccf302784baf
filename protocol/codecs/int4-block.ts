// int4-block: blockwise absmax with scale = absmax / 7 (float32) and q = floor(x / scale + 0.5) in [-7, 7].
// Two elements per byte: element 2i in the low nibble, 2i+1 in the high nibble, each a
// 4-bit two's complement; an odd count leaves the last high nibble 0.
// |x - x'| <= scale / 2 + 2^-24 |x'|.
import { blockSizeOf, bytesOf, checkFrameBlockSize, expectBytes, firstBadScale, float32sOf } from './codec.ts';
import type { TensorCodec } from './codec.ts';
import { blockCount, quantizeBlocks } from './int8-block.ts';

export const int4BlockCodec: TensorCodec = {
  name: 'int4-block',
  encode(data, spec) {
    const blockSize = blockSizeOf(spec);
    const n = data.length;
    const q = new Int8Array(new ArrayBuffer((n + 3) & ~3), 0, n);
    const scales = new Float32Array(blockCount(n, blockSize));
    quantizeBlocks(data, blockSize, 7, q, scales);
    const packed = new Uint8Array((n + 1) >> 1);
    const pairs = n >> 1;
    for (let j = 0; j < pairs; j++) packed[j] = (q[2 * j] & 0xf) | (q[2 * j + 1] << 4);
    if (n & 1) packed[pairs] = q[n - 1] & 0xf;
    return {
      payload: packed,
      params: { blockSize, scales: bytesOf(scales), k: 0, topkValues: null, indices: new Uint8Array(0) },
    };
  },
  checkSizes(frame, elements, field) {
    const blockSize = checkFrameBlockSize(frame, field);
    expectBytes(frame, `${field}.payload`, frame.payload.length, (elements + 1) >> 1);
    expectBytes(frame, `${field}.params.scales`, frame.params.scales.length, blockCount(elements, blockSize) * 4);
  },
  decodeInto(frame, out) {
    const bytes = frame.payload;
    const scales = float32sOf(frame.params.scales);
    const blockSize = frame.params.blockSize;
    const n = out.length;
    for (let b = 0, s = 0; s < n; b++, s += blockSize) {
      const e = Math.min(s + blockSize, n);
      const scale = scales[b];
      for (let i = s; i < e; i++) {
        const byte = bytes[i >> 1];
        // Sign-extend the nibble: move it to the top of an int32, then shift back arithmetically.
        out[i] = (i & 1 ? (byte << 24) >> 28 : (byte << 28) >> 28) * scale;
      }
    }
  },
  findNonFinite(frame) {
    const bad = firstBadScale(float32sOf(frame.params.scales), 7);
    return bad < 0 ? -1 : bad * frame.params.blockSize;
  },
};
