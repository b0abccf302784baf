// v1.1 adds the session's privacy defenses to Hello and Welcome. Its golden samples are kept
// forever; v1.0 samples still decode (golden.test.ts) and carry no defenses.
import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError, decodeEnvelope, encodeEnvelope } from '../../protocol/index.ts';
import type { Hello, Welcome } from '../../protocol/index.ts';

const read = (dir: string, name: string): Uint8Array => new Uint8Array(readFileSync(new URL(`../fixtures/protocol/${dir}/${name}.bin`, import.meta.url)));

const defenses = [
  { name: 'noise', scale: 0.5, clip: 2, noiseStd: 0.125 },
  { name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 },
  { name: 'gradient-noise', scale: 4, clip: 0, noiseStd: 0 },
  { name: 'deeper-bottom', scale: 1, clip: 0, noiseStd: 0 },
];

test('v1.1 hello and welcome decode to their defenses', () => {
  const hello = decodeEnvelope(read('v1.1', 'hello'));
  assert.deepEqual(hello.version, { major: 1, minor: 1 });
  assert.equal(hello.body.case, 'hello');
  const h = hello.body.value as Hello;
  assert.deepEqual(h.versions, { min: { major: 1, minor: 0 }, max: { major: 1, minor: 1 } });
  assert.equal(h.clientBuild, 'tandem-edge/1.1');
  assert.deepEqual(h.cut, { bottom: 2, top: 2 });
  assert.deepEqual(h.defenses, defenses);
  const welcome = decodeEnvelope(read('v1.1', 'welcome'));
  assert.equal(welcome.body.case, 'welcome');
  const w = welcome.body.value as Welcome;
  assert.deepEqual(w.version, { major: 1, minor: 1 });
  assert.equal(w.sessionId, 'sess-0001');
  assert.deepEqual(w.defenses, defenses);
});

test('a v1.0 hello carries no defenses field at all', () => {
  const h = decodeEnvelope(read('v1', 'hello')).body.value as Hello;
  assert.equal('defenses' in h, false);
});

function helloWith(list: Hello['defenses']): Uint8Array {
  const h = decodeEnvelope(read('v1.1', 'hello')).body.value as Hello;
  return encodeEnvelope({ version: { major: 1, minor: 1 }, requestId: 'r', body: { case: 'hello', value: { ...h, defenses: list } } });
}

test('a hello naming an unknown defense is refused with a typed error naming it', () => {
  assert.throws(
    () => decodeEnvelope(helloWith([{ name: 'noise', scale: 1, clip: 1, noiseStd: 0.1 }, { name: 'shuffle', scale: 0, clip: 0, noiseStd: 0 }])),
    (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_DEFENSE_UNKNOWN' && e.number === 4025 && /shuffle/.test(e.message) && e.details.field === 'hello.defenses[1].name',
  );
});

test('a defense given twice or with a negative or non-finite parameter is refused', () => {
  const twice = [{ name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 }, { name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 }];
  assert.throws(() => decodeEnvelope(helloWith(twice)), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FIELD_INVALID' && /twice/.test(e.message));
  assert.throws(() => decodeEnvelope(helloWith([{ name: 'noise', scale: -1, clip: 1, noiseStd: 0 }])), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FIELD_INVALID' && e.details.field === 'hello.defenses[0].scale');
  assert.throws(() => decodeEnvelope(helloWith([{ name: 'noise', scale: Number.NaN, clip: 1, noiseStd: 0 }])), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FIELD_INVALID');
});
