// What an envelope would decode into is counted before it is decoded: a message of a few MB
// made of millions of empty frames, or a packed shape of millions of entries, is refused
// without building them; every real envelope passes.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import test from 'node:test';
import { MAX_DECODED_VALUES, ProtocolError, checkDecodedValues, decodeEnvelope, encodeEnvelope, encodeTensor, envelope } from '../../protocol/index.ts';
import { wireTypes } from '../../protocol/schema.ts';

function varint(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return out;
}

/** field (length-delimited) of `bytes` */
function ld(field: number, bytes: Uint8Array | number[]): Uint8Array {
  const head = [...varint(field * 8 + 2), ...varint(bytes.length)];
  const out = new Uint8Array(head.length + bytes.length);
  out.set(head);
  out.set(bytes, head.length);
  return out;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** An envelope at 1.3 whose body is a Forward (field 14) made of `forward`'s bytes. */
function forwardEnvelope(forward: Uint8Array): Uint8Array {
  return concat([ld(1, [0x08, 0x01, 0x10, 0x03]), ld(2, new TextEncoder().encode('r')), ld(14, forward)]);
}

function refused(bytes: Uint8Array, code: string): ProtocolError {
  let caught: unknown;
  assert.throws(() => {
    try {
      decodeEnvelope(bytes, { maxMessageBytes: 64 << 20 });
    } catch (error) {
      caught = error;
      throw error;
    }
  });
  assert.ok(caught instanceof ProtocolError, String(caught));
  assert.equal(caught.code, code, caught.message);
  return caught;
}

test('a Forward of two million empty frames (4 MiB) is refused before protobufjs builds them', () => {
  const frames = new Uint8Array(2 * 2_000_000);
  for (let i = 0; i < frames.length; i += 2) frames[i] = 0x22; // field 4 (frames), length 0
  const heapBefore = process.memoryUsage().heapUsed;
  const error = refused(forwardEnvelope(frames), 'TANDEM_PROTO_MESSAGE_VALUES_EXCEEDED');
  assert.equal(error.details.limit, MAX_DECODED_VALUES);
  // Two million frame objects would be hundreds of MB of heap; the walk allocates nothing.
  assert.ok(process.memoryUsage().heapUsed - heapBefore < 32 << 20, 'nothing was built');
});

test('a packed shape of four million entries is refused; a real shape passes', () => {
  const shape = new Uint8Array(4_000_000).fill(1); // four million varints of 1
  const frame = ld(3, shape);
  refused(forwardEnvelope(ld(4, frame)), 'TANDEM_PROTO_MESSAGE_VALUES_EXCEEDED');
  // The same structure with a real frame decodes (and fails later, on what it says, if at all).
  const real = encodeEnvelope(envelope('r', { case: 'forward', value: { sessionId: 's', step: 1, microbatch: 0, needsBackward: true, frames: [encodeTensor(new Float32Array(24), [2, 3, 4], { codec: 'f32' }, { name: 'h_B' })] } }));
  assert.ok(checkDecodedValues(wireTypes.Envelope, real) < 32);
  assert.equal(decodeEnvelope(real).body.case, 'forward');
});

test('bytes that cannot be walked are malformed, not a crash', () => {
  refused(forwardEnvelope(new Uint8Array([0x22, 0x05, 0x00])), 'TANDEM_PROTO_MESSAGE_MALFORMED'); // a frame longer than its message
  refused(concat([ld(1, [0x08, 0x01, 0x10, 0x03]), new Uint8Array([0x70 | 0x80])]), 'TANDEM_PROTO_MESSAGE_MALFORMED'); // a tag cut short
  refused(concat([ld(1, [0x08, 0x01, 0x10, 0x03]), new Uint8Array([0x0b, 0x0c])]), 'TANDEM_PROTO_MESSAGE_MALFORMED'); // a group
});

test('every golden envelope, and a StepCommit exporting 500 frames, stays far under the limit', () => {
  const dirs = ['v1/', 'v1.1/', 'v1.2-infer/', 'v1.2-loss/', 'v1.3-held/'].map((d) => new URL(`../fixtures/protocol/${d}`, import.meta.url));
  let seen = 0;
  for (const dir of dirs) {
    for (const name of readdirSync(dir).filter((n) => n.endsWith('.bin'))) {
      const bytes = new Uint8Array(readFileSync(new URL(name, dir)));
      assert.ok(checkDecodedValues(wireTypes.Envelope, bytes) < 1000, name);
      seen++;
    }
  }
  assert.ok(seen > 10, `${seen} golden envelopes`);
  const frame = encodeTensor(new Float32Array(8), [2, 4], { codec: 'f32' }, { name: 'base_model.model.layers.0.self_attn.q_proj.lora_A.weight' });
  const commit = encodeEnvelope(envelope('c', { case: 'stepCommitted', value: { sessionId: 's', step: 3, middleGradSquareSum: 0, frames: Array.from({ length: 500 }, () => frame) } as never }));
  const values = checkDecodedValues(wireTypes.Envelope, commit);
  assert.ok(values > 500 && values < MAX_DECODED_VALUES / 4, `${values}`);
});
