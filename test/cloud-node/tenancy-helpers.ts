// What every tenancy test checks around an attack: the node stays up and ready, and a
// second, well-behaved tenant's step succeeds during and after it.
import assert from 'node:assert/strict';
import { TestClient, api, createTenantKey } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import type { Envelope } from '../../protocol/index.ts';

export interface GoodTenant {
  client: TestClient;
  key: string;
  /** Steps one whole step (forward and backward) and asserts it succeeded. */
  step(): Promise<void>;
}

export async function goodTenant(node: TestNode, name = 'bob'): Promise<GoodTenant> {
  const key = await createTenantKey(node, name);
  const client = await TestClient.connect(node, key);
  await client.hello();
  let next = 0;
  return {
    client,
    key,
    step: async () => {
      const g = await client.step(next++);
      assert.ok(g.length > 0 && g.every(Number.isFinite), "the good tenant's step returns a finite g_B");
    },
  };
}

export async function assertReady(node: TestNode): Promise<void> {
  const health = await api(node, 'GET', '/v1/health');
  assert.equal(health.status, 200, 'the node is up');
  const ready = await api(node, 'GET', '/v1/ready');
  assert.equal(ready.status, 200, 'the node is ready');
  assert.deepEqual(ready.json, { status: 'ready' });
}

/** The Error body of a reply envelope with this code; its details for further checks. */
export function errorDetails(reply: Envelope, code: string): Record<string, string> {
  assert.equal(reply.body.case, 'error', `expected Error ${code}, got ${reply.body.case}`);
  if (reply.body.case !== 'error') return {};
  assert.equal(reply.body.value.code, code, reply.body.value.message);
  return reply.body.value.details;
}
