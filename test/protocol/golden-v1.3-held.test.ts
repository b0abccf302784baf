// v1.3 adds the middle adapter the cloud holds: TrainingSpec.middle_adapter (field 4), StepCommit
// (envelope 21) and StepCommitted (22). Their golden samples are kept forever; the samples of
// 1.0–1.2 still decode, with no middle adapter.
import { readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError, decodeEnvelope, decodeTensor, encodeEnvelope } from '../../protocol/index.ts';
import type { Hello, StepCommit, StepCommitted } from '../../protocol/index.ts';

const read = (dir: string, name: string): Uint8Array => new Uint8Array(readFileSync(new URL(`../fixtures/protocol/${dir}/${name}.bin`, import.meta.url)));

const ADAPTER = { method: 'lora', rank: 8, alpha: 16, targets: ['q_proj', 'v_proj'], seed: 1234567, methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 };

test('the v1.3 hello decodes to its middle adapter, field for field', () => {
  const e = decodeEnvelope(read('v1.3-held', 'hello'));
  assert.deepEqual(e.version, { major: 1, minor: 3 });
  const h = e.body.value as Hello;
  assert.equal(e.body.case, 'hello');
  assert.deepEqual(h.training.middleAdapter, ADAPTER);
  assert.deepEqual(h.training.methods, ['lora']);
});

test('the v1.3 step commit and its reply decode, the adapter frame bit for bit', () => {
  const c = decodeEnvelope(read('v1.3-held', 'step-commit'));
  assert.equal(c.body.case, 'stepCommit');
  assert.deepEqual(c.body.value as StepCommit, { sessionId: 'sess-0001', step: 12, lr: 0.000123456789, maxGradNorm: 1, edgeGradSquareSum: 0.3125, microbatches: 2, exportAdapter: true });
  const r = decodeEnvelope(read('v1.3-held', 'step-committed'));
  assert.equal(r.body.case, 'stepCommitted');
  const v = r.body.value as StepCommitted;
  assert.deepEqual([v.sessionId, v.step, v.middleGradSquareSum], ['sess-0001', 12, 0.0625]);
  assert.equal(v.frames[0].name, 'base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight');
  assert.deepEqual([...decodeTensor(v.frames[0])], [0.5, -0.25, 1.5, 2]);
});

test('older hellos carry no middle adapter, and one without stays byte-identical', () => {
  for (const dir of ['v1', 'v1.1']) {
    const bytes = read(dir, 'hello');
    const h = decodeEnvelope(bytes).body.value as Hello;
    assert.equal('middleAdapter' in h.training, false, `${dir} hello`);
  }
  const v1 = decodeEnvelope(read('v1', 'hello'));
  assert.deepEqual(encodeEnvelope(v1), read('v1', 'hello'));
});

test('a middle adapter of an unknown method, over the rank limit or with no targets is refused by code', () => {
  const h = decodeEnvelope(read('v1.3-held', 'hello'));
  const withAdapter = (a: Record<string, unknown>): Uint8Array => {
    const value = h.body.value as Hello;
    return encodeEnvelope({ ...h, body: { case: 'hello', value: { ...value, training: { ...value.training, middleAdapter: { ...ADAPTER, ...a } as Hello['training']['middleAdapter'] } } } });
  };
  const codeOf = (bytes: Uint8Array): string => {
    try {
      decodeEnvelope(bytes);
      return 'accepted';
    } catch (err) {
      assert.ok(err instanceof ProtocolError);
      return `${err.code}:${String(err.details.field)}`;
    }
  };
  assert.equal(codeOf(withAdapter({ method: 'vera' })), 'TANDEM_PROTO_MIDDLE_ADAPTER_METHOD_UNKNOWN:hello.training.middle_adapter.method');
  assert.equal(codeOf(withAdapter({ rank: 100000 })), 'TANDEM_PROTO_MIDDLE_ADAPTER_LIMIT_EXCEEDED:hello.training.middle_adapter.rank');
  assert.equal(codeOf(withAdapter({ targets: [] })), 'TANDEM_PROTO_MIDDLE_ADAPTER_INVALID:hello.training.middle_adapter.targets');
  assert.equal(codeOf(withAdapter({ targets: ['q_proj; drop'] })), 'TANDEM_PROTO_MIDDLE_ADAPTER_INVALID:hello.training.middle_adapter.targets[0]');
  assert.equal(codeOf(withAdapter({ beta1: 1 })), 'TANDEM_PROTO_MIDDLE_ADAPTER_INVALID:hello.training.middle_adapter.beta1');
});
