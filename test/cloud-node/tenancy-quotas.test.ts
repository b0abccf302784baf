// Finding 5 of issue #9: no quotas. Each quota refuses the tenant over it with 429 /
// TANDEM_QUOTA_EXCEEDED naming the quota and its value, while another tenant keeps stepping.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import { MiddleExecutor } from '../../cloud-node/middle-executor.ts';
import { HIDDEN, STORIES_DIR, TestClient, api, createTenantKey, frameOf, helloBody, metric, randomTensor, startTestNode } from './helpers.ts';
import { assertReady, errorDetails, goodTenant } from './tenancy-helpers.ts';

describe('tenant quotas', () => {
  it('open sessions: the tenant over its quota gets TANDEM_QUOTA_EXCEEDED naming openSessions and its value', async () => {
    const node = await startTestNode({ quotas: { openSessions: 3 } });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const attacker = await TestClient.connect(node, key);
    const opened: string[] = [];
    let refused: Record<string, string> | undefined;
    for (let i = 0; i < 10 && refused === undefined; i++) {
      const reply = await attacker.request(helloBody());
      if (reply.body.case === 'welcome') opened.push(reply.body.value.sessionId);
      else refused = errorDetails(reply, 'TANDEM_QUOTA_EXCEEDED');
      if (i === 1) await good.step(); // during the attack
    }
    assert.equal(opened.length, 3, 'exactly the quota is opened');
    assert.equal(refused?.quota, 'openSessions');
    assert.equal(refused?.limit, '3');
    assert.equal(refused?.tenant, 'mallory');
    // The quota counts open sessions: closing one makes room again.
    assert.equal((await api(node, 'DELETE', `/v1/sessions/${opened[0]}`, key)).status, 200);
    assert.equal((await attacker.request(helloBody())).body.case, 'welcome');
    await good.step();
    await assertReady(node);
  });

  it('per-tenant overrides: one tenant held to a tighter quota than the others', async () => {
    const node = await startTestNode({ quotas: { openSessions: 4 }, tenantQuotas: { mallory: { openSessions: 1 } } });
    const good = await goodTenant(node);
    const attacker = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
    assert.equal((await attacker.request(helloBody())).body.case, 'welcome');
    const details = errorDetails(await attacker.request(helloBody()), 'TANDEM_QUOTA_EXCEEDED');
    assert.deepEqual([details.quota, details.limit], ['openSessions', '1']);
    for (let i = 0; i < 3; i++) assert.equal((await good.client.request(helloBody())).body.case, 'welcome', 'the others keep the default of 4');
    await good.step();
    await assertReady(node);
  });

  it('bytes per minute on the data plane: refused once the minute is spent, another tenant unaffected', async () => {
    const node = await startTestNode({ quotas: { bytesPerMinute: 64 * 1024 } });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const attacker = await TestClient.connect(node, key);
    await attacker.hello();
    const shape: [number, number, number] = [1, 32, HIDDEN]; // 8 KiB of h_B per Forward
    let refused: Record<string, string> | undefined;
    let sent = 0;
    for (let step = 0; step < 40 && refused === undefined; step++) {
      const reply = await attacker.request(attacker.forwardBody(step, 0, [frameOf(randomTensor(shape, step), shape)], false));
      if (reply.body.case === 'error') refused = errorDetails(reply, 'TANDEM_QUOTA_EXCEEDED');
      else sent += 1;
      if (step === 2) await good.step();
    }
    assert.ok(sent >= 5 && sent < 10, `${sent} forwards of 8 KiB fit in 64 KiB`);
    assert.equal(refused?.quota, 'bytesPerMinute');
    assert.equal(refused?.limit, String(64 * 1024));
    await good.step();
    await assertReady(node);
  });

  it('tokens in flight: a Forward declaring more tokens than the quota is refused before any compute', async () => {
    const node = await startTestNode({ quotas: { tokensInFlight: 64 } });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const attacker = await TestClient.connect(node, key);
    await attacker.hello();
    const shape: [number, number, number] = [2, 40, HIDDEN]; // 80 tokens
    const during = good.step();
    const reply = await attacker.request(attacker.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)]));
    const details = errorDetails(reply, 'TANDEM_QUOTA_EXCEEDED');
    assert.equal(details.quota, 'tokensInFlight');
    assert.equal(details.limit, '64');
    await during;
    // Within the quota the same tenant computes, and nothing stays reserved after a step.
    for (let i = 0; i < 3; i++) assert.equal((await attacker.request(attacker.forwardBody(i, 0, [frameOf(randomTensor([1, 64, HIDDEN], i), [1, 64, HIDDEN])], false))).body.case, 'forwardResult');
    await good.step();
    await assertReady(node);
  });

  it('REST request rate: @fastify/rate-limit per tenant, 429 TANDEM_QUOTA_EXCEEDED naming requestsPerMinute', async () => {
    const node = await startTestNode({ quotas: { requestsPerMinute: 5 } });
    const good = await goodTenant(node);
    const key = await createTenantKey(node, 'mallory');
    const statuses: number[] = [];
    let body: Record<string, unknown> = {};
    for (let i = 0; i < 8; i++) {
      const r = await api(node, 'GET', '/v1/models', key);
      statuses.push(r.status);
      if (r.status === 429) body = r.json;
    }
    assert.deepEqual(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert.equal(body.code, 'TANDEM_QUOTA_EXCEEDED');
    assert.deepEqual({ quota: (body.details as Record<string, unknown>).quota, limit: (body.details as Record<string, unknown>).limit }, { quota: 'requestsPerMinute', limit: 5 });
    // Another tenant has its own allowance, on REST and on the socket; the admin is not limited.
    assert.equal((await api(node, 'GET', '/v1/models', good.key)).status, 200);
    await good.step();
    for (let i = 0; i < 8; i++) assert.equal((await api(node, 'GET', '/v1/sessions', node.adminKey)).status, 200);
    await assertReady(node);
  });

  it('error feedback: a tenant\'s residuals of a lossy gradient codec are held to its feedbackBytes, all its sessions together; another tenant keeps its own', async () => {
    const shape: [number, number, number] = [1, 8, HIDDEN];
    const residual = shape[0] * shape[1] * shape[2] * 4; // one per micro-batch index, the size of g_B
    const node = await startTestNode({ tenantQuotas: { mallory: { feedbackBytes: 2 * residual } } });
    const feedbackBytes = (): Promise<number> => metric(node, 'tandem_feedback_bytes');
    const lossy = { codecs: { forward: [{ codec: 'f32' as const }], backward: [{ codec: 'int8-block' as const, blockSize: 64 }] } };
    const good = await TestClient.connect(node, await createTenantKey(node, 'alice'));
    await good.hello(lossy);
    const gradient = async (client: TestClient, microbatch: number, sessionId: string): Promise<void> => {
      const f = await client.request(client.forwardBody(0, microbatch, [frameOf(randomTensor(shape, 10 + microbatch), shape)], true, sessionId));
      assert.equal(f.body.case, 'forwardResult');
      const b = await client.request(client.backwardBody(0, microbatch, [frameOf(randomTensor(shape, 20 + microbatch), shape)], sessionId));
      assert.equal(b.body.case, 'backwardResult');
    };
    await gradient(good, 0, good.sessionId);
    assert.equal(await feedbackBytes(), residual);
    const malloryKey = await createTenantKey(node, 'mallory');
    const attacker = await TestClient.connect(node, malloryKey);
    const sessions: string[] = [];
    for (let i = 0; i < 3; i++) sessions.push((await attacker.hello(lossy)).sessionId);
    // Three sessions, four micro-batch indices each: twelve residuals asked for, two kept.
    for (const id of sessions) for (let m = 0; m < 4; m++) await gradient(attacker, m, id);
    assert.equal(await feedbackBytes(), residual + 2 * residual, 'alice\'s one and mallory\'s quota');
    for (let m = 1; m < 4; m++) await gradient(good, m, good.sessionId);
    assert.equal(await feedbackBytes(), 4 * residual + 2 * residual, 'alice keeps her four (the default quota)');
    // Closing a session gives its residuals back.
    assert.equal((await api(node, 'DELETE', `/v1/sessions/${sessions[2]}`, malloryKey)).status, 200);
    assert.equal(await feedbackBytes(), 4 * residual);
    await assertReady(node);
  });

  it('error feedback: a session closed while its Backward computes keeps no residual', async () => {
    // The Backward is held in the executor until the session is closed (helper-39's reproduction).
    let release!: () => void;
    let entered!: () => void;
    const gate = new Promise<void>((r) => { release = r; });
    const reached = new Promise<void>((r) => { entered = r; });
    const original = MiddleExecutor.prototype.backwardFromTape;
    MiddleExecutor.prototype.backwardFromTape = async function (this: MiddleExecutor, ...args: Parameters<typeof original>) {
      const out = await original.apply(this, args);
      entered();
      await gate;
      return out;
    };
    try {
      const shape: [number, number, number] = [1, 8, HIDDEN];
      const node = await startTestNode();
      const key = await createTenantKey(node, 'alice');
      const c = await TestClient.connect(node, key);
      await c.hello({ codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'int8-block', blockSize: 64 }] } });
      assert.equal((await c.request(c.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)]))).body.case, 'forwardResult');
      const pending = c.request(c.backwardBody(0, 0, [frameOf(randomTensor(shape, 2), shape)]));
      await reached;
      assert.equal((await api(node, 'DELETE', `/v1/sessions/${c.sessionId}`, key)).status, 200);
      release();
      await pending;
      assert.equal(await metric(node, 'tandem_feedback_bytes'), 0);
    } finally {
      MiddleExecutor.prototype.backwardFromTape = original;
    }
  });

  it('refuses a quota that is not a positive integer before starting, from the flags too', async () => {
    const log: string[] = [];
    assert.equal(await main(['cloud', '--model', STORIES_DIR, '--quota-sessions', '0'], { out: () => undefined, log: (l) => log.push(l) }), 2);
    assert.match(log.join('\n'), /TANDEM_CLI_FLAG_INVALID.*--quota-sessions/);
    await assert.rejects(startTestNode({ quotas: { openSessions: 0 } }), (e: Error & { code?: string }) => e.code === 'TANDEM_OPTION_INVALID' && /quotas\.openSessions/.test(e.message));
    await assert.rejects(startTestNode({ quotas: { bogus: 1 } as never }), (e: Error & { code?: string }) => e.code === 'TANDEM_OPTION_INVALID' && /unknown quota/.test(e.message));
  });
});
