// Encoding a tensor into a frame, and validating then decoding a received frame.
import { crc32 } from './crc32.ts';
import { CODECS } from './codecs/registry.ts';
import { firstNonFinite } from './codecs/codec.ts';
import { ProtocolError } from './errors.ts';
import { DEFAULT_LIMITS } from './limits.ts';
import type { CodecSpec, DTypeName, Limits, TensorFrame } from './messages.ts';

export interface EncodeTensorOptions {
  name?: string;
  /** The precision the tensor had before encoding; f32 by default. */
  dtype?: DTypeName;
  /** Refuse NaN and infinities in the input (int8, int4 and top-k always refuse them). */
  checkFinite?: boolean;
  /** Let f16 carry infinities (values beyond its range) instead of refusing them. */
  allowNonFinite?: boolean;
}

/** What the receiving session expects of a frame. */
export interface FrameExpectation {
  /** Expected shape; null for a dimension that may vary (still bounded by the limits). */
  shape?: readonly (number | null)[];
  limits?: Limits;
  allowNonFinite?: boolean;
  /** Names the frame in errors, e.g. "forward.frames[0]". */
  field?: string;
}

/** CRC-32 of payload, then params.scales, then params.indices. */
export function frameChecksum(frame: Pick<TensorFrame, 'payload' | 'params'>): number {
  return crc32(frame.params.indices, crc32(frame.params.scales, crc32(frame.payload)));
}

/** Bytes a frame carries: payload plus codec parameters. */
export function frameBytes(frame: Pick<TensorFrame, 'payload' | 'params'>): number {
  return frame.payload.length + frame.params.scales.length + frame.params.indices.length;
}

function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function encodeTensor(data: Float32Array, shape: readonly number[], spec: CodecSpec, options: EncodeTensorOptions = {}): TensorFrame {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0 || d > 0xffffffff) {
      throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: 'shape', reason: `[${shape.join(', ')}] has a dimension that is not a uint32` });
    }
  }
  if (elementCount(shape) !== data.length) {
    throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: 'data', reason: `${data.length} elements do not fill shape [${shape.join(', ')}]` });
  }
  const codec = CODECS[spec.codec];
  if (codec === undefined) throw new ProtocolError('TANDEM_PROTO_CODEC_UNSUPPORTED', { codec: String(spec.codec), field: 'spec.codec' });
  if (options.checkFinite) {
    const bad = firstNonFinite(data);
    if (bad >= 0) throw new ProtocolError('TANDEM_PROTO_FRAME_NON_FINITE', { field: 'input', index: bad });
  }
  const { payload, params } = codec.encode(data, spec, { allowNonFinite: options.allowNonFinite ?? false });
  const frame: TensorFrame = { name: options.name ?? '', dtype: options.dtype ?? 'f32', shape: [...shape], codec: spec.codec, params, payload, crc32: 0 };
  frame.crc32 = frameChecksum(frame);
  return frame;
}

/**
 * Checks a received frame against the limits, the expected shape, its codec's sizes and its
 * checksum, allocating nothing. Returns the element count.
 */
export function validateFrame(frame: TensorFrame, expectation: FrameExpectation = {}): number {
  const limits = expectation.limits ?? DEFAULT_LIMITS;
  const field = expectation.field ?? (frame.name || 'frame');
  const shape = frame.shape;
  if (shape.length > limits.maxRank) {
    throw new ProtocolError('TANDEM_PROTO_FRAME_RANK_EXCEEDED', { field, actual: shape.length, limit: limits.maxRank });
  }
  let elements = 1;
  for (const d of shape) {
    if (d > limits.maxDim) throw new ProtocolError('TANDEM_PROTO_FRAME_DIM_EXCEEDED', { field, actual: d, limit: limits.maxDim });
    elements *= d;
    // Checked per dimension, so the product never leaves the exact integer range.
    if (elements > limits.maxElements) throw new ProtocolError('TANDEM_PROTO_FRAME_ELEMENTS_EXCEEDED', { field, limit: limits.maxElements });
  }
  const expected = expectation.shape;
  if (expected !== undefined && (expected.length !== shape.length || expected.some((d, i) => d !== null && d !== shape[i]))) {
    throw new ProtocolError('TANDEM_PROTO_FRAME_SHAPE_MISMATCH', {
      field,
      actual: `[${shape.join(', ')}]`,
      expected: `[${expected.map((d) => (d === null ? '*' : d)).join(', ')}]`,
    });
  }
  const bytes = frameBytes(frame);
  if (bytes > limits.maxFrameBytes) throw new ProtocolError('TANDEM_PROTO_FRAME_TOO_LARGE', { field, actual: bytes, limit: limits.maxFrameBytes });
  const codec = CODECS[frame.codec];
  if (codec === undefined) throw new ProtocolError('TANDEM_PROTO_CODEC_UNSUPPORTED', { codec: String(frame.codec), field: `${field}.codec` });
  codec.checkSizes(frame, elements, field);
  const actual = frameChecksum(frame);
  if (actual !== frame.crc32) {
    throw new ProtocolError('TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH', { field, actual: hex(frame.crc32), expected: hex(actual) });
  }
  return elements;
}

const hex = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;

/** Validates (see validateFrame), then decodes into a new Float32Array. */
export function decodeTensor(frame: TensorFrame, expectation: FrameExpectation = {}): Float32Array {
  const elements = validateFrame(frame, expectation);
  const field = expectation.field ?? (frame.name || 'frame');
  const codec = CODECS[frame.codec];
  const out = new Float32Array(elements);
  codec.decodeInto(frame, out, field);
  if (!expectation.allowNonFinite) {
    // Each codec checks what is cheapest: the scales for the integer codecs, the encoded bits for halves.
    const bad = codec.findNonFinite(frame, out);
    if (bad >= 0) throw new ProtocolError('TANDEM_PROTO_FRAME_NON_FINITE', { field, index: bad });
  }
  return out;
}
