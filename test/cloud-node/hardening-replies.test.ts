// Finding 4 of issue 9: replies kept for retries were outside the memory budget and kept twice
// (decoded and encoded); many micro-batch indices in one step held hundreds of MB the budget
// never saw. Replies are now kept once, encoded, within the budget and bounded per session.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { HIDDEN, TestClient, createTenantKey, frameOf, metric, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

const BUDGET = 256 * 1024;
const PER_SESSION = 16;
let node: TestNode;
let good: Bystander;
let attacker: TestClient;
const shape: [number, number, number] = [1, 32, HIDDEN]; // 8 KiB per reply

before(async () => {
  node = await startTestNode({ memoryBudgetBytes: BUDGET, maxRepliesPerSession: PER_SESSION });
  good = await bystander(node);
  attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
  await attacker.hello();
});

describe('finding 4: replies kept for retries are in the memory budget, kept once and bounded per session', () => {
  it('80 micro-batch indices in one step keep at most the per-session bound of replies, within the budget', async () => {
    const h = randomTensor(shape, 9);
    await survives(node, good, async () => {
      for (let mb = 0; mb < 80; mb++) {
        const reply = await attacker.request(attacker.forwardBody(0, mb, [frameOf(h, shape)], false));
        assert.equal(reply.body.case, 'forwardResult');
      }
    });
    const replyBytes = await metric(node, 'tandem_reply_cache_bytes');
    const oneReply = 32 * HIDDEN * 4;
    assert.ok(replyBytes > 0, 'replies are kept');
    // The attacker's 16 and the good tenant's two steps' worth at most: never 80.
    assert.ok(replyBytes <= (PER_SESSION + 4) * (oneReply + 512), `${replyBytes} bytes of replies`);
    assert.ok(replyBytes + (await metric(node, 'tandem_activation_cache_bytes')) <= BUDGET);
    assert.ok((await metric(node, 'tandem_activation_evictions_total{reason="reply"}')) === 80 - PER_SESSION);
  });

  it('a retry of a recent micro-batch is answered from the kept bytes; one whose reply left is computed again, identically', async () => {
    const h = randomTensor(shape, 9);
    const replaysBefore = await metric(node, 'tandem_step_replays_total{kind="forward"}');
    const stepsBefore = await metric(node, 'tandem_steps_total{kind="forward"}');
    const recent = await attacker.request(attacker.forwardBody(0, 79, [frameOf(h, shape)], false), 'r-79');
    assert.equal(await metric(node, 'tandem_step_replays_total{kind="forward"}'), replaysBefore + 1);
    const old = await attacker.request(attacker.forwardBody(0, 0, [frameOf(h, shape)], false), 'r-0');
    assert.equal(await metric(node, 'tandem_steps_total{kind="forward"}'), stepsBefore + 1, 'micro-batch 0\'s reply left: computed again');
    assert.equal(recent.body.case, 'forwardResult');
    assert.equal(old.body.case, 'forwardResult');
    if (recent.body.case === 'forwardResult' && old.body.case === 'forwardResult') {
      assert.deepEqual(old.body.value.frames[0].payload, recent.body.value.frames[0].payload, 'the same h_B gives the same h_M');
    }
  });
});
