// Finding 1 of issue 9: a Hello stating a tiny max_message_bytes, then any Forward, made the
// reply throw outside any handler and the process exit. Limits now have floors, the request
// id is bounded, and nothing thrown while replying leaves the handler.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { LIMIT_FLOORS, decodeEnvelope, encodeEnvelope, envelope } from '../../protocol/index.ts';
import type { Hello } from '../../protocol/index.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, helloBody, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let attacker: TestClient;

before(async () => {
  node = await startTestNode();
  good = await bystander(node);
  attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
});

const shape: [number, number, number] = [1, 8, HIDDEN];

describe('finding 1: negotiated limits have floors; a reply never throws out of its handler', () => {
  it('a Hello stating max_message_bytes = 1 is refused with TANDEM_PROTO_FIELD_INVALID naming the field and the floor', async () => {
    const hello = helloBody().value as Hello;
    const reply = await survives(node, good, () => attacker.request({
      case: 'hello', value: { ...hello, limits: { maxFrameBytes: 0, maxMessageBytes: 1, maxRank: 0, maxDim: 0, maxElements: 0 } },
    }));
    assertError(reply, 'TANDEM_PROTO_FIELD_INVALID');
    assert.equal(reply.body.case === 'error' && reply.body.value.details.field, 'hello.limits.max_message_bytes');
    assert.match(reply.body.case === 'error' ? reply.body.value.message : '', new RegExp(`floor of ${LIMIT_FLOORS.maxMessageBytes}`));
  });

  it('a session at the floor gets its Forward replies in chunks of at most the floor', async () => {
    const welcome = await attacker.hello({ limits: { maxFrameBytes: 0, maxMessageBytes: LIMIT_FLOORS.maxMessageBytes, maxRank: 0, maxDim: 0, maxElements: 0 } });
    assert.equal(welcome.limits.maxMessageBytes, LIMIT_FLOORS.maxMessageBytes);
    attacker.maxMessageBytes = LIMIT_FLOORS.maxMessageBytes;
    const big: [number, number, number] = [1, 64, HIDDEN]; // 16 KiB: 5 chunks each way
    const reply = await survives(node, good, () => attacker.request(attacker.forwardBody(0, 0, [frameOf(randomTensor(big, 1), big)], false)));
    assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value));
  });

  it('a request id too long to name a reply stream is refused with TANDEM_PROTO_FIELD_INVALID, and a long allowed one still gets a chunked reply', async () => {
    // 10,000 characters: its reply's chunk header alone would pass the session's 4 KiB messages.
    const longId = 'x'.repeat(10_000);
    const bytes = encodeEnvelope(envelope(longId, attacker.forwardBody(1, 0, [frameOf(randomTensor(shape, 2), shape)], false)));
    const ack = await survives(node, good, () => attacker.sendRaw(bytes));
    const reply = decodeEnvelope(ack as Uint8Array);
    assertError(reply, 'TANDEM_PROTO_FIELD_INVALID');
    assert.equal(reply.body.case === 'error' && reply.body.value.details.field, 'envelope.request_id');
    const big: [number, number, number] = [1, 64, HIDDEN];
    const ok = await attacker.request(attacker.forwardBody(2, 0, [frameOf(randomTensor(big, 3), big)], false), 'y'.repeat(256));
    assert.equal(ok.body.case, 'forwardResult', JSON.stringify(ok.body.value));
  });
});
