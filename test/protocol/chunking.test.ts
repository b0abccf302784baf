// Frames larger than the transport's message limit travel as chunks and come back whole.
import test from 'node:test';
import assert from 'node:assert/strict';
import { HELD_CHUNK_OVERHEAD_BYTES, ProtocolError, ReassemblyBudget, Reassembler, crc32, decodeEnvelope, decodeTensor, encodeEnvelope, encodeTensor, envelope, messagesForTransport, splitMessage } from '../../protocol/index.ts';
import type { Chunk } from '../../protocol/index.ts';
import { activationLike } from '../fixtures/protocol/activations.ts';

function refuses(fn: () => unknown, code: string): ProtocolError {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof ProtocolError, `expected ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  return caught;
}

const data = activationLike(8 * 1024, 7, 256);
const message = encodeEnvelope(envelope('req-7', {
  case: 'forward',
  value: { sessionId: 's', step: 1, microbatch: 0, needsBackward: true, frames: [encodeTensor(data, [32, 256], { codec: 'f32' }, { name: 'h_B' })] },
}));
const LIMIT = 4096;

function chunksOf(bytes: Uint8Array, limit = LIMIT): Chunk[] {
  return splitMessage(bytes, 'req-7', limit).map((encoded) => {
    assert.ok(encoded.length <= limit, `chunk of ${encoded.length} bytes is within ${limit}`);
    const body = decodeEnvelope(encoded).body;
    assert.equal(body.case, 'chunk');
    return body.value as Chunk;
  });
}

test('a message over the limit is split into chunks within the limit and reassembled whole', () => {
  const chunks = chunksOf(message);
  const room = chunks[0].data.length;
  assert.ok(room > LIMIT - 100, `${room} bytes of data per chunk: little is lost to headers`);
  assert.equal(chunks.length, Math.ceil(message.length / room));
  const reassembler = new Reassembler();
  let whole: Uint8Array | null = null;
  chunks.forEach((chunk, i) => {
    whole = reassembler.accept(chunk);
    assert.equal(whole === null, i < chunks.length - 1);
  });
  assert.deepEqual(whole, message);
  const body = decodeEnvelope(whole!).body;
  assert.equal(body.case, 'forward');
  assert.deepEqual(body.case === 'forward' && decodeTensor(body.value.frames[0], { shape: [32, 256] }), data);
  assert.equal(reassembler.openStreams.length, 0);
  assert.equal(reassembler.reservedBytes, 0);
});

test('a message within the limit is sent as it is', () => {
  assert.deepEqual(messagesForTransport(message, 'req-7', message.length), [message]);
  assert.equal(messagesForTransport(message, 'req-7', LIMIT).length, chunksOf(message).length);
});

test('a duplicate chunk is detected and the stream still completes', () => {
  const chunks = chunksOf(message);
  const reassembler = new Reassembler();
  reassembler.accept(chunks[0]);
  reassembler.accept(chunks[1]);
  refuses(() => reassembler.accept(chunks[1]), 'TANDEM_PROTO_CHUNK_DUPLICATE');
  refuses(() => reassembler.accept(chunks[0]), 'TANDEM_PROTO_CHUNK_DUPLICATE');
  let whole: Uint8Array | null = null;
  for (const chunk of chunks.slice(2)) whole = reassembler.accept(chunk);
  assert.deepEqual(whole, message);
});

test('an out-of-order chunk is detected and its stream dropped', () => {
  const chunks = chunksOf(message);
  const reassembler = new Reassembler();
  reassembler.accept(chunks[0]);
  const error = refuses(() => reassembler.accept(chunks[2]), 'TANDEM_PROTO_CHUNK_OUT_OF_ORDER');
  assert.deepEqual(error.details, { streamId: 'req-7', index: 2, expected: 1 });
  assert.equal(reassembler.openStreams.length, 0);
  refuses(() => new Reassembler().accept(chunks[3]), 'TANDEM_PROTO_CHUNK_OUT_OF_ORDER');
});

test('a missing chunk is detected: a gap, or a stream that ends incomplete', () => {
  const chunks = chunksOf(message);
  const reassembler = new Reassembler();
  for (const chunk of chunks.slice(0, -1)) reassembler.accept(chunk);
  const error = refuses(() => reassembler.close('req-7'), 'TANDEM_PROTO_CHUNK_MISSING');
  assert.deepEqual(error.details, { streamId: 'req-7', received: chunks.length - 1, count: chunks.length });
  assert.equal(reassembler.reservedBytes, 0);
});

test('a corrupted or inconsistent chunk is refused', () => {
  const chunks = chunksOf(message);
  const corrupted = { ...chunks[0], data: new Uint8Array(chunks[0].data) };
  corrupted.data[10] ^= 0xff;
  refuses(() => new Reassembler().accept(corrupted), 'TANDEM_PROTO_CHUNK_INVALID');
  const reassembler = new Reassembler();
  reassembler.accept(chunks[0]);
  refuses(() => reassembler.accept({ ...chunks[1], totalBytes: chunks[1].totalBytes + 1 }), 'TANDEM_PROTO_CHUNK_INVALID');
  refuses(() => new Reassembler().accept({ ...chunks[0], index: 5, count: 5 }), 'TANDEM_PROTO_CHUNK_INVALID');
});

test('reassembly memory is bounded: message size, open streams and reserved bytes', () => {
  const chunks = chunksOf(message);
  refuses(() => new Reassembler({ maxMessageBytes: message.length - 1 }).accept(chunks[0]), 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
  const twoStreams = new Reassembler({ maxOpenStreams: 2 });
  twoStreams.accept({ ...chunks[0], streamId: 'a' });
  twoStreams.accept({ ...chunks[0], streamId: 'b' });
  refuses(() => twoStreams.accept({ ...chunks[0], streamId: 'c' }), 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
  const bytes = new Reassembler({ maxTotalBytes: message.length * 1.5 });
  bytes.accept({ ...chunks[0], streamId: 'a' });
  refuses(() => bytes.accept({ ...chunks[0], streamId: 'b' }), 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
  // A lying total (4 GiB declared) is refused before it is allocated.
  refuses(() => new Reassembler().accept({ ...chunks[0], totalBytes: 0xffffffff }), 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
});

test('a limit too small for any chunk data is refused', () => {
  refuses(() => splitMessage(message, 'req-7', 20), 'TANDEM_PROTO_INPUT_INVALID');
});

test('each held chunk costs the budget its bytes and its overhead: tiny chunks cannot hold far more memory than the budget counts', () => {
  const budget = new ReassemblyBudget(64 * 1024);
  const r = new Reassembler({ maxMessageBytes: 1 << 20, budget });
  const message = new Uint8Array(10_000).map((_, i) => i % 251);
  // One byte a chunk, as a hostile sender may cut it.
  const chunk = (index: number): Chunk => {
    const data = message.subarray(index, index + 1);
    return { streamId: 'tiny', index, count: message.length, totalBytes: message.length, crc32: crc32(data), data };
  };
  const perChunk = 1 + HELD_CHUNK_OVERHEAD_BYTES;
  const fits = Math.floor(budget.limit / perChunk);
  for (let i = 0; i < fits; i++) assert.equal(r.accept(chunk(i)), null);
  assert.equal(budget.used, fits * perChunk);
  const refused = refuses(() => r.accept(chunk(fits)), 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
  assert.equal(refused.details.limit, budget.limit);
  assert.equal(budget.used, 0, 'the refused stream gives back all it held');
  // Chunks of a real size fit as before, and a whole message gives everything back.
  const whole = new Reassembler({ maxMessageBytes: 1 << 20, budget });
  let out: Uint8Array | null = null;
  for (const b of splitMessage(message, 'real', 4096)) {
    const c = decodeEnvelope(b).body;
    assert.ok(c.case === 'chunk');
    out = whole.accept(c.value);
  }
  assert.deepEqual(out, message);
  assert.equal(budget.used, 0);
});
