import test from 'node:test';
import assert from 'node:assert/strict';
import { PROTOCOL_ERRORS, ProtocolError, errorBody, isProtocolErrorCode } from '../../protocol/index.ts';
import { isTandemError } from '../../common/define-errors.ts';
import { PROTO_SOURCES } from '../../protocol/schema.generated.ts';
import { renderSchemaModule } from '../fixtures/protocol/embed-schema.ts';
import { readFileSync } from 'node:fs';

test('the embedded schema is the .proto files as they are (else run test/fixtures/protocol/embed-schema.ts)', () => {
  const generated = readFileSync(new URL('../../protocol/schema.generated.ts', import.meta.url), 'utf8');
  assert.equal(generated, renderSchemaModule());
  assert.ok(Object.keys(PROTO_SOURCES).includes('envelope.proto'));
});

test('error codes are unique in name and number, and every message names its code', () => {
  const numbers = Object.values(PROTOCOL_ERRORS).map((e) => e.number);
  assert.equal(new Set(numbers).size, numbers.length);
  for (const code of Object.keys(PROTOCOL_ERRORS)) {
    assert.match(code, /^TANDEM_PROTO_[A-Z0-9_]+$/);
    assert.ok(isProtocolErrorCode(code));
  }
  assert.equal(isProtocolErrorCode('TANDEM_PROTO_NOPE'), false);
  assert.equal(isProtocolErrorCode('toString'), false);
});

test('a ProtocolError carries code, number, details and cause, and becomes an Error body', () => {
  const cause = new RangeError('index out of range');
  const error = new ProtocolError('TANDEM_PROTO_FRAME_RANK_EXCEEDED', { field: 'h_B', actual: 9, limit: 8 }, { cause });
  assert.equal(error.name, 'ProtocolError');
  assert.equal(error.number, 4009);
  assert.equal(error.cause, cause);
  // The code is kept out of the message; the Error body's message carries both, as it always did.
  assert.equal(error.message, 'frame h_B has rank 9, over the limit of 8');
  assert.equal(error.describe(), 'TANDEM_PROTO_FRAME_RANK_EXCEEDED (4009): frame h_B has rank 9, over the limit of 8');
  assert.ok(isTandemError(error));
  assert.deepEqual(errorBody(error), { code: 'TANDEM_PROTO_FRAME_RANK_EXCEEDED', message: error.describe(), details: { field: 'h_B', actual: '9', limit: '8' } });
});
