// The middle adapters a node holds for sessions (protocol 1.3), over the real data plane:
// created at Hello within the tenant's quotas, stepped by StepCommit (idempotent by step,
// typed errors for a gap or missing gradients), and freed when the session expires.
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import type { Body, MiddleAdapterSpec, StepCommitted } from '../../protocol/index.ts';
import { TestClient, assertError, createTenantKey, helloBody, metric, startTestNode } from './helpers.ts';

const ADAPTER: MiddleAdapterSpec = { method: 'lora', rank: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 11, methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 };
const CUT = { bottom: 1, top: 1 };

function training(adapter: Partial<MiddleAdapterSpec> = {}) {
  return { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0, middleAdapter: { ...ADAPTER, ...adapter } };
}

const commit = (sessionId: string, step: number, microbatches = 1, exportAdapter = false, lr = 1e-3): Body => ({
  case: 'stepCommit', value: { sessionId, step, lr, maxGradNorm: 1, edgeGradSquareSum: 0.5, microbatches, exportAdapter },
});

describe('middle adapters held by the node', () => {
  it('StepCommit applies once per step: a repeat answers the same, a gap or missing gradients are typed errors', async () => {
    const node = await startTestNode();
    const client = await TestClient.connect(node, await createTenantKey(node, 'alice'));
    const welcome = await client.hello({ cut: CUT, training: training() });
    assert.deepEqual(welcome.training.middleAdapter, ADAPTER, 'Welcome echoes the adapter the node holds');
    assert.equal(await metric(node, 'tandem_held_adapters'), 1);
    // 3 middle blocks: q_proj (A [4, 64], B [64, 4]) and v_proj (A [4, 64], B [32, 4]: 4 KV heads), weights and two AdamW buffers.
    assert.equal(await metric(node, 'tandem_held_adapter_bytes'), 3 * (512 + 384) * 12);
    await client.step(1);
    const first = await client.request(commit(client.sessionId, 1));
    assert.equal(first.body.case, 'stepCommitted', JSON.stringify(first.body.value));
    const answer = first.body.value as StepCommitted;
    assert.ok(answer.middleGradSquareSum > 0);
    const repeat = await client.request(commit(client.sessionId, 1));
    assert.deepEqual(repeat.body.value, answer, 'a repeat of the last committed step answers the same');
    assertError(await client.request(commit(client.sessionId, 3)), 'TANDEM_PROTO_STEP_COMMIT_OUT_OF_ORDER');
    assertError(await client.request(commit(client.sessionId, 2)), 'TANDEM_HELD_GRADIENTS_MISSING');
    await client.step(2);
    assert.equal((await client.request(commit(client.sessionId, 2))).body.case, 'stepCommitted');
    const exported = await client.request(commit(client.sessionId, 2, 1, true));
    assert.equal(exported.body.case, 'stepCommitted');
    const frames = (exported.body.value as StepCommitted).frames;
    assert.equal(frames.length, 12);
    assert.ok(frames.every((f) => /^base_model\.model\.model\.layers\.[123]\.self_attn\.[qv]_proj\.lora_[AB]\.weight$/.test(f.name)));
  });

  it('refuses a step that would leave the adapter non-finite, which changes nothing: the same step with a sane lr applies (found by fuzzing)', async () => {
    const node = await startTestNode();
    const client = await TestClient.connect(node, await createTenantKey(node, 'erin'));
    await client.hello({ cut: CUT, training: training() });
    await client.step(1);
    assertError(await client.request(commit(client.sessionId, 1, 1, false, 1e308)), 'TANDEM_RESULT_NON_FINITE');
    assert.equal((await client.request(commit(client.sessionId, 1))).body.case, 'stepCommitted', 'the gradients are still there, the adapter unchanged');
    await client.step(2);
    const exported = await client.request(commit(client.sessionId, 2, 1, true));
    assert.equal(exported.body.case, 'stepCommitted', JSON.stringify(exported.body.value));
  });

  it('refuses what it cannot hold: a rank over the tenant quota, a target the model lacks, the 1.0 flag alone; holds ia3', async () => {
    const node = await startTestNode({ quotas: { heldAdapterRank: 8 } });
    const key = await createTenantKey(node, 'bob');
    const client = await TestClient.connect(node, key);
    const hello = (t: ReturnType<typeof training> | { methods: string[]; cloudMiddleLora: boolean; middleLoraRank: number }) =>
      client.request({ case: 'hello', value: { ...(helloValue()), cut: CUT, training: t } } as Body);
    assert.equal((await hello(training({ method: 'ia3', rank: 0, alpha: 0, targets: ['k_proj', 'down_proj'] }))).body.case, 'welcome');
    assertError(await hello(training({ rank: 16 })), 'TANDEM_QUOTA_EXCEEDED');
    assertError(await hello(training({ targets: ['nope_proj'] })), 'TANDEM_PROTO_MIDDLE_ADAPTER_INVALID');
    assertError(await hello({ methods: [], cloudMiddleLora: true, middleLoraRank: 8 }), 'TANDEM_FEATURE_UNSUPPORTED');
    assert.equal(await metric(node, 'tandem_held_adapters'), 1, 'only the ia3 session holds an adapter');
  });

  it('a session whose edge vanished frees its adapter, and its checkpoint, when it expires', async () => {
    const node = await startTestNode({ sessions: { idleMs: 1500 }, sweepIntervalMs: 100 });
    const client = await TestClient.connect(node, await createTenantKey(node, 'carol'));
    await client.hello({ cut: CUT, training: training() });
    await client.step(1);
    const held = join(node.stateDir, 'held');
    assert.deepEqual((await readdir(held)).sort(), [`${client.sessionId}.json`, `${client.sessionId}.step-1.mb-0.f32`], 'the adapter, and the gradients of the step in progress');
    assert.equal(await metric(node, 'tandem_held_adapters'), 1);
    // The edge goes away without a SessionClose.
    for (let i = 0; i < 100 && (await metric(node, 'tandem_held_adapters')) > 0; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await metric(node, 'tandem_held_adapters'), 0, 'freed at expiry');
    assert.equal(await metric(node, 'tandem_held_adapter_bytes'), 0);
    assert.deepEqual(await readdir(held), [], 'the checkpoint and the gradient files are removed');
    assertError(await client.request(commit(client.sessionId, 1)), 'TANDEM_SESSION_CLOSED');
  });
});

function helloValue() {
  const body = helloBody();
  if (body.case !== 'hello') throw new Error('helloBody is not a hello');
  return body.value;
}
