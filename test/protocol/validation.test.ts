// A received frame is checked before anything is allocated; each refusal names what was wrong.
import test from 'node:test';
import assert from 'node:assert/strict';
import {
  DEFAULT_LIMITS, ProtocolError, decodeEnvelope, decodeTensor, encodeEnvelope, encodeTensor, envelope, frameChecksum, intersectLimits, validateFrame,
} from '../../protocol/index.ts';
import type { TensorFrame } from '../../protocol/index.ts';

function refuses(fn: () => unknown, code: string, details: Record<string, unknown> = {}): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof ProtocolError, `expected ProtocolError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    for (const [key, value] of Object.entries(details)) assert.equal(error.details[key], value, `details.${key}`);
    return true;
  });
}

const x = new Float32Array(24).map((_, i) => i - 12.5);
const frameOf = (codec: TensorFrame['codec'] = 'int8-block'): TensorFrame => encodeTensor(x, [2, 3, 4], { codec, blockSize: 8 }, { name: 'h_B' });

/** A tampered copy with a correct checksum, so the check under test is the one that fires. */
function tampered(frame: TensorFrame, change: Partial<TensorFrame>): TensorFrame {
  const out = { ...frame, ...change, params: { ...frame.params, ...(change.params ?? {}) } };
  out.crc32 = frameChecksum(out);
  return out;
}

test('a frame of the expected shape decodes; a wildcard dimension accepts any size', () => {
  assert.equal(decodeTensor(frameOf(), { shape: [2, 3, 4] }).length, 24);
  assert.equal(decodeTensor(frameOf(), { shape: [null, 3, 4] }).length, 24);
});

test('a shape other than the session expects is refused', () => {
  refuses(() => decodeTensor(frameOf(), { shape: [2, 4, 3] }), 'TANDEM_PROTO_FRAME_SHAPE_MISMATCH', { actual: '[2, 3, 4]', expected: '[2, 4, 3]' });
  refuses(() => decodeTensor(frameOf(), { shape: [6, 4] }), 'TANDEM_PROTO_FRAME_SHAPE_MISMATCH');
});

test('rank, dimension, element and byte limits are enforced', () => {
  const limits = { ...DEFAULT_LIMITS, maxRank: 2 };
  refuses(() => decodeTensor(frameOf(), { limits }), 'TANDEM_PROTO_FRAME_RANK_EXCEEDED', { actual: 3, limit: 2 });
  refuses(() => decodeTensor(frameOf(), { limits: { ...DEFAULT_LIMITS, maxDim: 3 } }), 'TANDEM_PROTO_FRAME_DIM_EXCEEDED', { actual: 4, limit: 3 });
  refuses(() => decodeTensor(frameOf(), { limits: { ...DEFAULT_LIMITS, maxElements: 23 } }), 'TANDEM_PROTO_FRAME_ELEMENTS_EXCEEDED', { limit: 23 });
  refuses(() => decodeTensor(frameOf('f32'), { limits: { ...DEFAULT_LIMITS, maxFrameBytes: 95 } }), 'TANDEM_PROTO_FRAME_TOO_LARGE', { actual: 96, limit: 95 });
});

test('a giant declared shape is refused before anything is allocated', () => {
  const giant = tampered(frameOf(), { shape: [65536, 65536, 65536, 65536] });
  const before = process.memoryUsage().arrayBuffers;
  refuses(() => decodeTensor(giant, { limits: { ...DEFAULT_LIMITS, maxDim: 1 << 20 } }), 'TANDEM_PROTO_FRAME_ELEMENTS_EXCEEDED');
  // Within limits but inconsistent with the payload: refused on sizes, still before allocation.
  refuses(() => decodeTensor(tampered(frameOf(), { shape: [4096, 4096] })), 'TANDEM_PROTO_FRAME_SIZE_MISMATCH', { expected: 4096 * 4096, actual: 24 });
  assert.ok(process.memoryUsage().arrayBuffers - before < 1 << 20);
});

test('sizes inconsistent with the codec are refused, naming the field', () => {
  const f = frameOf();
  refuses(() => decodeTensor(tampered(f, { payload: f.payload.subarray(1) })), 'TANDEM_PROTO_FRAME_SIZE_MISMATCH', { field: 'h_B.payload', expected: 24, actual: 23 });
  refuses(() => decodeTensor(tampered(f, { params: { ...f.params, scales: f.params.scales.subarray(4) } })), 'TANDEM_PROTO_FRAME_SIZE_MISMATCH', { field: 'h_B.params.scales' });
  refuses(() => decodeTensor(tampered(f, { params: { ...f.params, blockSize: 0 } })), 'TANDEM_PROTO_CODEC_PARAMS_INVALID');
  const half = frameOf('f16');
  refuses(() => decodeTensor(tampered(half, { payload: new Uint8Array(47) })), 'TANDEM_PROTO_FRAME_SIZE_MISMATCH', { expected: 48 });
  const topk = encodeTensor(x, [24], { codec: 'topk', topkFraction: 0.25 });
  refuses(() => decodeTensor(tampered(topk, { params: { ...topk.params, k: 25 } })), 'TANDEM_PROTO_FRAME_PAYLOAD_INVALID');
  refuses(() => decodeTensor(tampered(topk, { params: { ...topk.params, indices: new Uint8Array([0, 0, 0, 0, 0, 30]) } })), 'TANDEM_PROTO_FRAME_PAYLOAD_INVALID');
  refuses(() => decodeTensor(tampered(topk, { params: { ...topk.params, indices: new Uint8Array([0, 0, 0, 0, 0, 0x80]) } })), 'TANDEM_PROTO_FRAME_PAYLOAD_INVALID');
});

test('a checksum mismatch is refused', () => {
  const f = frameOf();
  const flipped = new Uint8Array(f.payload);
  flipped[5] ^= 1;
  refuses(() => decodeTensor({ ...f, payload: flipped }), 'TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH', { field: 'h_B' });
  refuses(() => validateFrame({ ...f, crc32: f.crc32 ^ 1 }), 'TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH');
});

test('NaN and infinities are refused unless the session allows them', () => {
  const withNaN = encodeTensor(new Float32Array([1, NaN, 3]), [3], { codec: 'f32' });
  refuses(() => decodeTensor(withNaN), 'TANDEM_PROTO_FRAME_NON_FINITE', { index: 1 });
  assert.ok(Number.isNaN(decodeTensor(withNaN, { allowNonFinite: true })[1]));
  const withInf = encodeTensor(new Float32Array([1, 2, Infinity]), [3], { codec: 'f16' }, { allowNonFinite: true });
  refuses(() => decodeTensor(withInf), 'TANDEM_PROTO_FRAME_NON_FINITE', { index: 2 });
  refuses(() => decodeTensor(encodeTensor(new Float32Array([-Infinity]), [1], { codec: 'bf16' })), 'TANDEM_PROTO_FRAME_NON_FINITE');
  // An int8 scale that is not finite (or overflows float32 at 127) would decode to infinities.
  const f = frameOf();
  const scales = new Float32Array(3).fill(1);
  scales[2] = 3e38;
  refuses(() => decodeTensor(tampered(f, { params: { ...f.params, scales: new Uint8Array(scales.buffer) } })), 'TANDEM_PROTO_FRAME_NON_FINITE', { index: 16 });
});

test('a message over the limit is refused before parsing', () => {
  const bytes = encodeEnvelope(envelope('r', { case: 'forward', value: { sessionId: 's', step: 0, microbatch: 0, frames: [frameOf('f32')], needsBackward: false } }));
  refuses(() => decodeEnvelope(bytes, { maxMessageBytes: bytes.length - 1 }), 'TANDEM_PROTO_MESSAGE_TOO_LARGE', { actual: bytes.length, limit: bytes.length - 1 });
});

test('payloads decoded from an envelope are views into the received bytes', () => {
  const bytes = encodeEnvelope(envelope('r', { case: 'forward', value: { sessionId: 's', step: 0, microbatch: 0, frames: [frameOf('f32')], needsBackward: false } }));
  const received = new Uint8Array(bytes);
  const body = decodeEnvelope(received).body;
  assert.equal(body.case === 'forward' && body.value.frames[0].payload.buffer, received.buffer);
});

test('bad input to the encoder is refused', () => {
  refuses(() => encodeTensor(x, [5, 5], { codec: 'f32' }), 'TANDEM_PROTO_INPUT_INVALID');
  refuses(() => encodeTensor(x, [24], { codec: 'int8-block', blockSize: 0.5 }), 'TANDEM_PROTO_CODEC_PARAMS_INVALID');
  refuses(() => encodeTensor(x, [24], { codec: 'topk', topkFraction: 2 }), 'TANDEM_PROTO_CODEC_PARAMS_INVALID');
  refuses(() => encodeTensor(x, [24], { codec: 'zstd' as never }), 'TANDEM_PROTO_CODEC_UNSUPPORTED');
});

test('session limits are the stricter of both sides, with defaults for unstated (0) values', () => {
  const edge = { maxFrameBytes: 1 << 20, maxMessageBytes: 0, maxRank: 4, maxDim: 0, maxElements: 1 << 30 };
  const cloud = { maxFrameBytes: 1 << 24, maxMessageBytes: 1 << 16, maxRank: 0, maxDim: 4096, maxElements: 0 };
  assert.deepEqual(intersectLimits(edge, cloud), {
    maxFrameBytes: 1 << 20,
    maxMessageBytes: 1 << 16,
    maxRank: 4,
    maxDim: 4096,
    maxElements: DEFAULT_LIMITS.maxElements,
  });
});

test('a top-k frame whose kept values hold an infinity is refused, naming the element', () => {
  // 70000 is beyond f16: with allowNonFinite the sender's f16 values carry an infinity.
  const frame = encodeTensor(new Float32Array([0, 1, 0, 70000]), [4], { codec: 'topk', topkFraction: 0.5 }, { allowNonFinite: true });
  refuses(() => decodeTensor(frame), 'TANDEM_PROTO_FRAME_NON_FINITE', { index: 3 });
  assert.equal(decodeTensor(frame, { allowNonFinite: true })[3], Infinity);
});
