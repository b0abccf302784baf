// Hellos sent at once by one tenant get exactly its openSessions quota, also when each asks for
// a middle adapter held by the node, whose checkpoint is written (an await) before the session
// record is added; and exactly its heldAdapterBytes quota.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { MiddleAdapterSpec } from '../../protocol/index.ts';
import { TestClient, createTenantKey, helloBody, metric, startTestNode } from './helpers.ts';

const ADAPTER: MiddleAdapterSpec = { method: 'lora', rank: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 11, methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 };

describe('openSessions under concurrent Hellos', () => {
  for (const held of [false, true]) {
    it(`12 Hellos at once${held ? ' with a held middle adapter' : ''}: 3 welcomes, 9 TANDEM_QUOTA_EXCEEDED naming openSessions`, async () => {
      const node = await startTestNode({ quotas: { openSessions: 3 } });
      const client = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
      const training = { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0, ...(held ? { middleAdapter: ADAPTER } : {}) };
      const replies = await Promise.all(Array.from({ length: 12 }, () => client.request(helloBody({ cut: { bottom: 1, top: 1 }, training }))));
      const refused = replies.filter((r) => r.body.case === 'error' && r.body.value.code === 'TANDEM_QUOTA_EXCEEDED' && r.body.value.details.quota === 'openSessions');
      assert.deepEqual([replies.filter((r) => r.body.case === 'welcome').length, refused.length], [3, 9], JSON.stringify(replies.map((r) => r.body.case)));
      assert.equal(await metric(node, 'tandem_sessions_open'), 3);
      if (held) assert.equal(await metric(node, 'tandem_held_adapters'), 3, 'a refused Hello holds no adapter');
    });
  }

  it('9 Hellos with a held middle adapter, the quota fitting 2 adapters: 2 welcomes, 7 TANDEM_QUOTA_EXCEEDED naming heldAdapterBytes', async () => {
    // One adapter (r 4 on q_proj and v_proj of blocks 1-3 of stories260K, weights and AdamW's buffers) is 32256 bytes.
    const node = await startTestNode({ quotas: { openSessions: 50, heldAdapterBytes: 2 * 32256 + 100 } });
    const client = await TestClient.connect(node, await createTenantKey(node, 'mallory'));
    const training = { methods: ['lora'], cloudMiddleLora: false, middleLoraRank: 0, middleAdapter: ADAPTER };
    const first = await client.request(helloBody({ cut: { bottom: 1, top: 1 }, training }));
    assert.equal(first.body.case, 'welcome');
    const replies = await Promise.all(Array.from({ length: 8 }, () => client.request(helloBody({ cut: { bottom: 1, top: 1 }, training }))));
    const refused = replies.filter((r) => r.body.case === 'error' && r.body.value.code === 'TANDEM_QUOTA_EXCEEDED' && r.body.value.details.quota === 'heldAdapterBytes');
    assert.deepEqual([replies.filter((r) => r.body.case === 'welcome').length, refused.length], [1, 7], JSON.stringify(replies.map((r) => r.body.case)));
    assert.equal(await metric(node, 'tandem_held_adapter_bytes'), 2 * 32256);
  });
});
