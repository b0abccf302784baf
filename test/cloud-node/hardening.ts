// What every hardening test asserts around an attack: the node stays up and ready, and a
// second tenant's step made during the attack and one made after it both succeed.
import assert from 'node:assert/strict';
import { HIDDEN, TestClient, api, createTenantKey } from './helpers.ts';
import type { TestNode } from './helpers.ts';

export interface Bystander {
  client: TestClient;
  /** One whole step (forward and backward) of the good tenant; resolves to g_B's length. */
  step(): Promise<number>;
}

let tenants = 0;

/** A good tenant with an open session on `node`. */
export async function bystander(node: TestNode): Promise<Bystander> {
  const client = await TestClient.connect(node, await createTenantKey(node, `good${++tenants}`));
  await client.hello();
  let step = 0;
  return { client, step: async () => (await client.step(step++)).length };
}

/**
 * Runs `attack` while the bystander steps, then checks that the node is ready and the
 * bystander steps again. Returns what the attack returned.
 */
export async function survives<T>(node: TestNode, good: Bystander, attack: () => Promise<T>): Promise<T> {
  const during = good.step();
  const result = await attack();
  assert.equal(await during, 8 * HIDDEN, 'the good tenant\'s step during the attack succeeds');
  const ready = await api(node, 'GET', '/v1/ready');
  assert.equal(ready.status, 200, JSON.stringify(ready.json));
  assert.equal(ready.json.status, 'ready');
  assert.equal(await good.step(), 8 * HIDDEN, 'the good tenant\'s step after the attack succeeds');
  return result;
}
