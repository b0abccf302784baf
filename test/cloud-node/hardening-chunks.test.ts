// Finding 6 of issue 9: a legitimate reply of more than 10 chunks never arrived, since the
// chunks went as one socket.io packet with that many binary attachments and socket.io's
// parser takes 10. Beyond MAX_ACK_CHUNKS they are now pushed as events before the ack.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { CloudConnection } from '../../edge-client/index.ts';
import { LIMIT_FLOORS, decodeTensor, envelope } from '../../protocol/index.ts';
import type { Hello } from '../../protocol/index.ts';
import { HIDDEN, TestClient, createTenantKey, frameOf, helloBody, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let key = '';
const shape: [number, number, number] = [64, 32, HIDDEN]; // 512 KiB (about 130 chunks of 4 KiB), short sequences: cheap to compute
const floorLimits = { maxFrameBytes: 0, maxMessageBytes: LIMIT_FLOORS.maxMessageBytes, maxRank: 0, maxDim: 0, maxElements: 0 };

before(async () => {
  node = await startTestNode({ limits: { maxMessageBytes: 1024 * 1024, maxFrameBytes: 1024 * 1024 } });
  good = await bystander(node);
  key = await createTenantKey(node, 'carol');
});

describe('finding 6: chunked replies arrive whatever their count', () => {
  it('a Forward reply of 100+ chunks arrives whole (test client), equal to the same Forward unchunked', async () => {
    const h = randomTensor(shape, 21);
    const chunked = await TestClient.connect(node, key);
    await chunked.hello({ limits: floorLimits });
    // The request goes whole (the node takes 1 MiB messages); the reply comes in 4 KiB chunks.
    chunked.maxMessageBytes = 1024 * 1024;
    const whole = await TestClient.connect(node, key);
    whole.maxMessageBytes = 1024 * 1024;
    await whole.hello();
    const before = await metric(node, 'tandem_message_bytes_total{direction="out"}');
    const reply = await survives(node, good, () => chunked.request(chunked.forwardBody(0, 0, [frameOf(h, shape)], false)));
    const sent = (await metric(node, 'tandem_message_bytes_total{direction="out"}')) - before;
    assert.ok(sent / LIMIT_FLOORS.maxMessageBytes > 100, `${sent} bytes went out: more than 100 chunks`);
    const reference = await whole.request(whole.forwardBody(0, 0, [frameOf(h, shape)], false));
    assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value));
    assert.equal(reference.body.case, 'forwardResult');
    if (reply.body.case === 'forwardResult' && reference.body.case === 'forwardResult') {
      assert.deepEqual(decodeTensor(reply.body.value.frames[0]), decodeTensor(reference.body.value.frames[0]));
    }
  });

  it('the edge\'s connection gets the same 100+ chunk reply, twice in a row on one socket', async () => {
    const connection = await CloudConnection.open(node.url, { key, requestTimeoutMs: 20_000 });
    try {
      const welcome = await connection.request(envelope('hello-1', { case: 'hello', value: { ...(helloBody().value as Hello), limits: floorLimits } }));
      assert.equal(welcome.body.case, 'welcome');
      const sessionId = welcome.body.case === 'welcome' ? welcome.body.value.sessionId : '';
      for (const step of [0, 1]) {
        const h = randomTensor(shape, 30 + step);
        const reply = await survives(node, good, () => connection.request(envelope(`fwd-${step}`, {
          case: 'forward', value: { sessionId, step, microbatch: 0, frames: [frameOf(h, shape)], needsBackward: false },
        })));
        assert.equal(reply.body.case, 'forwardResult', JSON.stringify(reply.body.value));
        assert.deepEqual(reply.body.case === 'forwardResult' && reply.body.value.frames[0].shape, shape);
      }
    } finally {
      connection.close();
    }
  });
});
