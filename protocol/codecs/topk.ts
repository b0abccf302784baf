// topk: keeps the k elements of largest |x|; the rest decode to 0.
//   params.k        number kept
//   params.indices  kept indices, ascending, as LEB128 varints of gaps: the first index,
//                   then index[j] - index[j-1] - 1
//   payload         kept values in index order: f16 (2k bytes), or int8-block (k bytes,
//                   with params.block_size and params.scales as in int8-block)
// Kept elements carry their value codec's error; dropped ones lose |x| <= the k-th largest |x|.
import { ProtocolError } from '../errors.ts';
import type { TopkValuesCodec } from '../messages.ts';
import {
  alignedBytes, blockSizeOf, bytesOf, checkFrameBlockSize, expectBytes, firstBadScale, firstNonFinite, float32sOf, nonFiniteInput, uint16sOf,
} from './codec.ts';
import type { TensorCodec } from './codec.ts';
import { decodeF16Into, encodeF16, firstNonFiniteF16 } from './f16.ts';
import { blockCount, dequantizeInt8Blocks, quantizeBlocks } from './int8-block.ts';

export const DEFAULT_TOPK_FRACTION = 0.01;

export function topkCount(elements: number, fraction: number): number {
  if (!(fraction > 0 && fraction <= 1)) {
    throw new ProtocolError('TANDEM_PROTO_CODEC_PARAMS_INVALID', { field: 'topkFraction', reason: `${fraction} is not in (0, 1]` });
  }
  return Math.min(elements, Math.max(elements > 0 ? 1 : 0, Math.round(elements * fraction)));
}

/** Ascending indices of the k largest |x|, ties broken by lower index. Radix select on the float bits. */
export function selectTopk(x: Float32Array, k: number): Uint32Array {
  const n = x.length;
  const bits = new Int32Array(x.buffer, x.byteOffset, n);
  const selected = new Uint32Array(k);
  if (k === 0) return selected;
  // |x| as int32 bits orders like |x|. Histogram the top 16 bits, find the bucket holding the k-th largest.
  const histogram = new Uint32Array(1 << 16);
  for (let i = 0; i < n; i++) {
    const a = bits[i] & 0x7fffffff;
    if (a >= 0x7f800000) throw nonFiniteInput(i);
    histogram[a >>> 15]++;
  }
  let bucket = 0xffff;
  let above = 0;
  while (above + histogram[bucket] < k) above += histogram[bucket--];
  // Within the bucket, sort the candidates to find the exact threshold bits.
  const candidates = new Int32Array(histogram[bucket]);
  let c = 0;
  for (let i = 0; i < n; i++) {
    const a = bits[i] & 0x7fffffff;
    if (a >>> 15 === bucket) candidates[c++] = a;
  }
  candidates.sort();
  const threshold = candidates[candidates.length - (k - above)];
  let atThreshold = k - above - (candidates.length - candidates.lastIndexOf(threshold) - 1);
  let j = 0;
  for (let i = 0; i < n && j < k; i++) {
    const a = bits[i] & 0x7fffffff;
    if (a > threshold) selected[j++] = i;
    else if (a === threshold && atThreshold > 0) {
      selected[j++] = i;
      atThreshold--;
    }
  }
  return selected;
}

function writeGaps(indices: Uint32Array): Uint8Array {
  const out = new Uint8Array(indices.length * 5);
  let p = 0;
  let previous = -1;
  for (let j = 0; j < indices.length; j++) {
    let gap = indices[j] - previous - 1;
    previous = indices[j];
    while (gap >= 0x80) {
      out[p++] = (gap & 0x7f) | 0x80;
      gap >>>= 7;
    }
    out[p++] = gap;
  }
  return out.slice(0, p);
}

function invalid(field: string, reason: string): ProtocolError {
  return new ProtocolError('TANDEM_PROTO_FRAME_PAYLOAD_INVALID', { field, reason });
}

/** Reads k gap varints; every index must be below `elements` and the bytes used up exactly. */
function readIndices(bytes: Uint8Array, k: number, elements: number, field: string): Uint32Array {
  const indices = new Uint32Array(k);
  let p = 0;
  let previous = -1;
  for (let j = 0; j < k; j++) {
    let gap = 0;
    let shift = 0;
    for (;;) {
      if (p >= bytes.length) throw invalid(`${field}.params.indices`, `ends inside index ${j} of ${k}`);
      const b = bytes[p++];
      if (shift === 28 && b > 0x0f) throw invalid(`${field}.params.indices`, `index ${j} does not fit 32 bits`);
      gap += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) break;
      shift += 7;
    }
    const index = previous + 1 + gap;
    if (index >= elements) throw invalid(`${field}.params.indices`, `index ${index} is outside ${elements} elements`);
    indices[j] = index;
    previous = index;
  }
  if (p !== bytes.length) throw invalid(`${field}.params.indices`, `${bytes.length - p} bytes left after ${k} indices`);
  return indices;
}

function valuesCodec(value: TopkValuesCodec | null, field: string): TopkValuesCodec {
  if (value === null) {
    throw new ProtocolError('TANDEM_PROTO_CODEC_PARAMS_INVALID', { field: `${field}.params.topk_values`, reason: 'missing' });
  }
  return value;
}

export const topkCodec: TensorCodec = {
  name: 'topk',
  encode(data, spec, context) {
    const k = topkCount(data.length, spec.topkFraction ?? DEFAULT_TOPK_FRACTION);
    const values = spec.topkValues ?? 'f16';
    const indices = selectTopk(data, k);
    const kept = new Float32Array(k);
    for (let j = 0; j < k; j++) kept[j] = data[indices[j]];
    const params = { blockSize: 0, scales: new Uint8Array(0), k, topkValues: values, indices: writeGaps(indices) };
    if (values === 'f16') return { payload: bytesOf(encodeF16(kept, context.allowNonFinite)), params };
    const blockSize = blockSizeOf(spec);
    const q = new Int8Array(new ArrayBuffer((k + 3) & ~3), 0, k);
    const scales = new Float32Array(blockCount(k, blockSize));
    quantizeBlocks(kept, blockSize, 127, q, scales);
    return { payload: bytesOf(q), params: { ...params, blockSize, scales: bytesOf(scales) } };
  },
  checkSizes(frame, elements, field) {
    const { k, indices, scales } = frame.params;
    if (k > elements) throw invalid(`${field}.params.k`, `k = ${k} is above the ${elements} elements`);
    // Each index takes 1 to 5 varint bytes.
    if (indices.length < k || indices.length > 5 * k) {
      throw new ProtocolError('TANDEM_PROTO_FRAME_SIZE_MISMATCH', { field: `${field}.params.indices`, actual: indices.length, expected: `${k} to ${5 * k}`, codec: frame.codec });
    }
    if (valuesCodec(frame.params.topkValues, field) === 'f16') {
      expectBytes(frame, `${field}.payload`, frame.payload.length, 2 * k);
    } else {
      const blockSize = checkFrameBlockSize(frame, field);
      expectBytes(frame, `${field}.payload`, frame.payload.length, k);
      expectBytes(frame, `${field}.params.scales`, scales.length, blockCount(k, blockSize) * 4);
    }
  },
  decodeInto(frame, out, field) {
    const { k } = frame.params;
    const indices = readIndices(frame.params.indices, k, out.length, field);
    const kept = new Float32Array(k);
    if (frame.params.topkValues === 'f16') {
      decodeF16Into(uint16sOf(frame.payload), kept);
    } else {
      const payload = alignedBytes(frame.payload, 4);
      dequantizeInt8Blocks(new Int8Array(payload.buffer, payload.byteOffset, k), float32sOf(frame.params.scales), frame.params.blockSize, kept);
    }
    for (let j = 0; j < k; j++) out[indices[j]] = kept[j];
  },
  findNonFinite(frame, out) {
    // The kept values are few: check them, and only when one is bad scan the output for its index.
    const bad = frame.params.topkValues === 'f16'
      ? firstNonFiniteF16(uint16sOf(frame.payload))
      : firstBadScale(float32sOf(frame.params.scales), 127);
    return bad < 0 ? -1 : firstNonFinite(out);
  },
};
