// The v1 golden samples are kept forever: every build must decode them to exactly these values.
import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import { decodeEnvelope, decodeTensor } from '../../protocol/index.ts';
import type { Body, Envelope, TensorFrame } from '../../protocol/index.ts';

const read = (name: string): Uint8Array => new Uint8Array(readFileSync(new URL(`../fixtures/protocol/v1/${name}.bin`, import.meta.url)));

function decodeSample(name: string): Envelope {
  const decoded = decodeEnvelope(read(name));
  assert.deepEqual(decoded.version, { major: 1, minor: 0 });
  return decoded;
}

function bodyOf<C extends Body['case']>(envelope: Envelope, expected: C): Extract<Body, { case: C }>['value'] {
  assert.equal(envelope.body.case, expected);
  // The case was just checked; TypeScript cannot narrow a generic union by it.
  return envelope.body.value as never;
}

const model = { id: 'stories260K', contentHash: `sha256:${'ab'.repeat(32)}` };
const limits = { maxFrameBytes: 67108864, maxMessageBytes: 1048576, maxRank: 4, maxDim: 65536, maxElements: 16777216 };
const training = { methods: ['lora', 'prompt-tuning'], cloudMiddleLora: true, middleLoraRank: 8 };

function checkFrame(frame: TensorFrame, expected: Omit<TensorFrame, 'payload' | 'params'> & { payload: number[]; blockSize: number; scales: number[]; k: number; topkValues: string | null; indices: number[] }, decoded: number[]): void {
  assert.equal(frame.name, expected.name);
  assert.equal(frame.dtype, expected.dtype);
  assert.deepEqual(frame.shape, expected.shape);
  assert.equal(frame.codec, expected.codec);
  assert.deepEqual([...frame.payload], expected.payload);
  assert.equal(frame.params.blockSize, expected.blockSize);
  assert.deepEqual([...new Float32Array(new Uint8Array(frame.params.scales).buffer)], expected.scales);
  assert.equal(frame.params.k, expected.k);
  assert.equal(frame.params.topkValues, expected.topkValues);
  assert.deepEqual([...frame.params.indices], expected.indices);
  assert.equal(frame.crc32, expected.crc32);
  assert.deepEqual([...decodeTensor(frame, { shape: expected.shape })], decoded);
}

test('v1 hello decodes to its values', () => {
  const e = decodeSample('hello');
  assert.equal(e.requestId, 'req-0001');
  assert.deepEqual(bodyOf(e, 'hello'), {
    versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } },
    clientBuild: 'tandem-edge/0.1.0',
    model,
    codecs: {
      forward: [{ codec: 'int8-block', blockSize: 64 }, { codec: 'f16' }],
      backward: [{ codec: 'topk', topkFraction: 0.25, topkValues: 'int8-block', blockSize: 32 }, { codec: 'bf16' }],
    },
    limits,
    cut: { bottom: 2, top: 2 },
    training,
    allowNonFinite: false,
  });
});

test('v1 welcome decodes to its values', () => {
  const e = decodeSample('welcome');
  assert.equal(e.requestId, 'req-0001');
  assert.deepEqual(bodyOf(e, 'welcome'), {
    version: { major: 1, minor: 0 },
    serverBuild: 'tandem-cloud/0.1.0',
    sessionId: 'sess-0001',
    model,
    codecs: { forward: { codec: 'int8-block', blockSize: 64 }, backward: { codec: 'topk', topkFraction: 0.25, topkValues: 'int8-block', blockSize: 32 } },
    limits,
    cut: { bottom: 2, top: 2 },
    training,
    allowNonFinite: false,
  });
});

test('v1 session-open and session-close decode to their values', () => {
  const open = decodeSample('session-open');
  assert.equal(open.requestId, 'req-0002');
  assert.deepEqual(bodyOf(open, 'sessionOpen'), { sessionId: 'sess-0001', resumeStep: 7 });
  const close = decodeSample('session-close');
  assert.equal(close.requestId, 'req-0099');
  assert.deepEqual(bodyOf(close, 'sessionClose'), { sessionId: 'sess-0001', reason: 'completed', message: 'all steps done' });
});

test('v1 forward decodes to its values (f32 and int8-block frames)', () => {
  const e = decodeSample('forward');
  assert.equal(e.requestId, 'req-0003');
  const body = bodyOf(e, 'forward');
  assert.deepEqual([body.sessionId, body.step, body.microbatch, body.needsBackward, body.frames.length], ['sess-0001', 12, 3, true, 2]);
  checkFrame(body.frames[0], {
    name: 'h_B', dtype: 'f32', shape: [2, 4], codec: 'f32', crc32: 0x5cddd8d8, blockSize: 0, scales: [], k: 0, topkValues: null, indices: [],
    payload: [0, 0, 192, 63, 0, 0, 16, 192, 0, 0, 0, 0, 0, 0, 64, 64, 0, 0, 0, 62, 0, 0, 0, 191, 0, 0, 200, 66, 0, 0, 128, 189],
  }, [1.5, -2.25, 0, 3, 0.125, -0.5, 100, -0.0625]);
  checkFrame(body.frames[1], {
    name: 'h_B.int8', dtype: 'f32', shape: [1, 8], codec: 'int8-block', crc32: 0xe6b61006, blockSize: 4, scales: [1, 1], k: 0, topkValues: null, indices: [],
    payload: [127, 192, 0, 1, 129, 32, 255, 2],
  }, [127, -64, 0, 1, -127, 32, -1, 2]);
});

test('v1 forward-result decodes to its values (f16 frame: max, subnormal, -0, rounding)', () => {
  const e = decodeSample('forward-result');
  assert.equal(e.requestId, 'req-0003');
  const body = bodyOf(e, 'forwardResult');
  assert.deepEqual([body.sessionId, body.step, body.microbatch, body.frames.length], ['sess-0001', 12, 3, 1]);
  checkFrame(body.frames[0], {
    name: 'h_M', dtype: 'f16', shape: [2, 3], codec: 'f16', crc32: 0x341e789f, blockSize: 0, scales: [], k: 0, topkValues: null, indices: [],
    payload: [0, 56, 0, 188, 255, 123, 1, 0, 0, 128, 85, 53],
  }, [0.5, -1, 65504, 5.960464477539063e-8, -0, 0.333251953125]);
});

test('v1 backward decodes to its values (int4-block and top-k f16 frames)', () => {
  const e = decodeSample('backward');
  assert.equal(e.requestId, 'req-0004');
  const body = bodyOf(e, 'backward');
  assert.deepEqual([body.sessionId, body.step, body.microbatch, body.frames.length], ['sess-0001', 12, 3, 2]);
  checkFrame(body.frames[0], {
    name: 'g_M', dtype: 'f32', shape: [2, 4], codec: 'int4-block', crc32: 0x102c4885, blockSize: 4, scales: [1, 2], k: 0, topkValues: null, indices: [],
    payload: [151, 3, 151, 18],
  }, [7, -7, 3, 0, 14, -14, 4, 2]);
  checkFrame(body.frames[1], {
    name: 'h_B', dtype: 'f32', shape: [8], codec: 'topk', crc32: 0x4224a632, blockSize: 0, scales: [], k: 2, topkValues: 'f16', indices: [1, 2],
    payload: [0, 69, 0, 199],
  }, [0, 5, 0, 0, -7, 0, 0, 0]);
});

test('v1 backward-result decodes to its values (bf16 and top-k int8 frames)', () => {
  const e = decodeSample('backward-result');
  assert.equal(e.requestId, 'req-0004');
  const body = bodyOf(e, 'backwardResult');
  assert.deepEqual([body.sessionId, body.step, body.microbatch, body.recomputed, body.frames.length], ['sess-0001', 12, 3, true, 2]);
  checkFrame(body.frames[0], {
    name: 'g_B', dtype: 'bf16', shape: [4], codec: 'bf16', crc32: 0x9c9f801b, blockSize: 0, scales: [], k: 0, topkValues: null, indices: [],
    payload: [128, 63, 32, 192, 73, 64, 171, 62],
  }, [1, -2.5, 3.140625, 0.333984375]);
  // -127 / 2 = -63.5 and 1 / 2 = 0.5 are ties: they were rounded up, to -63 and 1.
  checkFrame(body.frames[1], {
    name: 'g_B.topk', dtype: 'f32', shape: [6], codec: 'topk', crc32: 0x06551ce4, blockSize: 32, scales: [2], k: 3, topkValues: 'int8-block', indices: [2, 1, 0],
    payload: [127, 193, 1],
  }, [0, 0, 254, 0, -126, 2]);
});

test('v1 heartbeat, error and chunk decode to their values', () => {
  const heartbeat = decodeSample('heartbeat');
  assert.equal(heartbeat.requestId, 'req-0005');
  assert.deepEqual(bodyOf(heartbeat, 'heartbeat'), { sessionId: 'sess-0001', sequence: 42, sentAtMs: 1764326400000.5 });
  const error = decodeSample('error');
  assert.equal(error.requestId, 'req-0003');
  assert.deepEqual(bodyOf(error, 'error'), {
    code: 'TANDEM_PROTO_FRAME_SHAPE_MISMATCH',
    message: 'TANDEM_PROTO_FRAME_SHAPE_MISMATCH (4013): frame forward.frames[0] has shape [2, 5]; the session expects [2, 4]',
    details: { field: 'forward.frames[0]', actual: '[2, 5]', expected: '[2, 4]' },
  });
  const chunk = decodeSample('chunk');
  assert.equal(chunk.requestId, 'req-big-1');
  const body = bodyOf(chunk, 'chunk');
  assert.deepEqual({ ...body, data: [...body.data] }, { streamId: 'req-big-1', index: 1, count: 3, totalBytes: 10, crc32: 0x538d4d69, data: [5, 6, 7, 8] });
});
