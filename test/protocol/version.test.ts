import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import {
  ProtocolError, SUPPORTED_VERSIONS, crc32, decodeEnvelope, encodeEnvelope, envelope, negotiateCodecs, negotiateVersion,
} from '../../protocol/index.ts';
import type { Hello } from '../../protocol/index.ts';
import { PROTO_SOURCES } from '../../protocol/schema.generated.ts';
import { buildSchemaRoot } from '../../protocol/schema.ts';

const v = (major: number, minor: number) => ({ major, minor });
const helloBytes = new Uint8Array(readFileSync(new URL('../fixtures/protocol/v1/hello.bin', import.meta.url)));

function throwsCode(fn: () => unknown, code: string): ProtocolError {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof ProtocolError, `expected ProtocolError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code);
  return caught;
}

test('the highest common version wins', () => {
  const ours = { min: v(1, 0), max: v(1, 3) };
  assert.deepEqual(negotiateVersion({ min: v(1, 1), max: v(2, 4) }, ours), v(1, 3));
  assert.deepEqual(negotiateVersion({ min: v(0, 9), max: v(1, 2) }, ours), v(1, 2));
  assert.deepEqual(negotiateVersion({ min: v(1, 0), max: v(1, 0) }), v(1, 0));
});

test('ranges that do not overlap are a typed error naming both ranges', () => {
  const error = throwsCode(() => negotiateVersion({ min: v(2, 0), max: v(2, 5) }, { min: v(1, 0), max: v(1, 3) }), 'TANDEM_PROTO_VERSION_UNSUPPORTED');
  assert.deepEqual(error.details, { ours: '[1.0, 1.3]', theirs: '[2.0, 2.5]' });
  assert.match(error.message, /\[2\.0, 2\.5\].*\[1\.0, 1\.3\]/);
  throwsCode(() => negotiateVersion({ min: v(1, 4), max: v(1, 2) }), 'TANDEM_PROTO_FIELD_INVALID');
});

test('a major-version-2 Hello is refused, naming both ranges', () => {
  const bytes = encodeEnvelope({
    version: v(2, 0),
    requestId: 'r',
    body: { case: 'hello', value: { ...(decodeEnvelope(helloBytes).body.value as Hello), versions: { min: v(2, 0), max: v(2, 1) } } },
  });
  const error = throwsCode(() => decodeEnvelope(bytes), 'TANDEM_PROTO_VERSION_UNSUPPORTED');
  assert.deepEqual(error.details, { ours: '[1.0, 1.3]', theirs: '[2.0, 2.1]' });
});

test('a major-version-2 message whose body no longer parses as v1 is still refused by version', () => {
  // Version 2.0, then field 14 (forward) as a fixed64: wire type 1 where v1 has a message.
  const bytes = new Uint8Array([0x0a, 0x02, 0x08, 0x02, 0x71, 1, 2, 3, 4, 5, 6, 7, 8]);
  const error = throwsCode(() => decodeEnvelope(bytes), 'TANDEM_PROTO_VERSION_UNSUPPORTED');
  assert.deepEqual(error.details, { ours: '[1.0, 1.3]', theirs: '2.0' });
});

test('a message without a version is refused', () => {
  throwsCode(() => decodeEnvelope(new Uint8Array([0x12, 0x01, 0x61])), 'TANDEM_PROTO_VERSION_MISSING');
});

test('a newer minor version decodes: unknown fields are ignored', () => {
  // Simulate a v1.1 peer: the same schema with new optional fields in Envelope, Hello and TensorFrame.
  const v11 = buildSchemaRoot({
    ...PROTO_SOURCES,
    'envelope.proto': PROTO_SOURCES['envelope.proto'].replace('    Chunk chunk = 20;\n  }', '    Chunk chunk = 20;\n  }\n  string trace_id = 30;'),
    'handshake.proto': PROTO_SOURCES['handshake.proto'].replace('  bool allow_non_finite = 8;', '  bool allow_non_finite = 8;\n  repeated string future_features = 40;'),
    'tensor.proto': PROTO_SOURCES['tensor.proto'].replace('  fixed32 crc32 = 7;', '  fixed32 crc32 = 7;\n  double future_scale = 20;'),
  });
  const Envelope = v11.lookupType('tandem.Envelope');
  const wire = Envelope.decode(helloBytes).toJSON();
  const newer = Envelope.encode(Envelope.fromObject({ ...wire, version: { major: 1, minor: 1 }, traceId: 'abc', hello: { ...wire.hello, futureFeatures: ['x', 'y'] } })).finish();
  assert.ok(newer.length > helloBytes.length + 8);
  const decoded = decodeEnvelope(newer);
  assert.deepEqual(decoded.version, v(1, 1));
  assert.deepEqual(decoded.body, decodeEnvelope(helloBytes).body);

  const forward = Envelope.fromObject({
    version: { major: 1, minor: 1 },
    forward: { sessionId: 's', frames: [{ dtype: 1, shape: [1], codec: 1, payload: Buffer.from([0, 0, 128, 63]), crc32: crc32(new Uint8Array([0, 0, 128, 63])), futureScale: 2.5 }] },
  });
  const body = decodeEnvelope(Envelope.encode(forward).finish()).body;
  assert.equal(body.case, 'forward');
  assert.deepEqual(body.case === 'forward' && [...body.value.frames[0].payload], [0, 0, 128, 63]);
});

test('an unknown field appended to a v1 envelope is ignored', () => {
  // Field 99, varint 1; then field 100, length-delimited "hi".
  const extended = new Uint8Array([...helloBytes, 0x98, 0x06, 0x01, 0xa2, 0x06, 0x02, 0x68, 0x69]);
  assert.deepEqual(decodeEnvelope(extended), decodeEnvelope(helloBytes));
});

test('a close reason added by a later minor version reads as unspecified', () => {
  const Envelope = buildSchemaRoot(PROTO_SOURCES).lookupType('tandem.Envelope');
  const bytes = Envelope.encode(Envelope.fromObject({ version: { major: 1, minor: 2 }, sessionClose: { sessionId: 's', reason: 9 } })).finish();
  const body = decodeEnvelope(bytes).body;
  assert.deepEqual(body, { case: 'sessionClose', value: { sessionId: 's', reason: 'unspecified', message: '' } });
});

test('a codec this build does not know is skipped in an offer, and codecs are chosen by the cloud\'s preference', () => {
  const Envelope = buildSchemaRoot(PROTO_SOURCES).lookupType('tandem.Envelope');
  const bytes = Envelope.encode(Envelope.fromObject({
    version: { major: 1, minor: 1 },
    hello: { versions: { min: v(1, 0), max: v(1, 1) }, codecs: { forward: [{ codec: 42 }, { codec: 2 }, { codec: 4, blockSize: 128 }], backward: [{ codec: 3 }] } },
  })).finish();
  const body = decodeEnvelope(bytes).body;
  assert.equal(body.case, 'hello');
  if (body.case !== 'hello') return;
  assert.deepEqual(body.value.codecs.forward, [{ codec: 'f16' }, { codec: 'int8-block', blockSize: 128 }]);
  assert.deepEqual(negotiateCodecs(body.value.codecs, { forward: ['int8-block', 'f16'], backward: ['topk', 'bf16'] }), {
    forward: { codec: 'int8-block', blockSize: 128 },
    backward: { codec: 'bf16' },
  });
  throwsCode(() => negotiateCodecs(body.value.codecs, { forward: ['topk'], backward: ['bf16'] }), 'TANDEM_PROTO_CODEC_NEGOTIATION_FAILED');
});

test('this build writes and reads its own version', () => {
  const bytes = encodeEnvelope(envelope('r', { case: 'heartbeat', value: { sessionId: 's', sequence: 1, sentAtMs: 2 } }));
  assert.deepEqual(decodeEnvelope(bytes).version, SUPPORTED_VERSIONS.max);
});
