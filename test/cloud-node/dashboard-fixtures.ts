// What the operator-view tests (cluster-route, dashboard) set up beside training: a federation
// whose first round the owners completed over REST.
import assert from 'node:assert/strict';
import { encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate } from '../../protocol/index.ts';
import { api } from './helpers.ts';
import type { TestNode } from './helpers.ts';

/** Creates federation `id` of `rounds` rounds for the owners (tenant → key) and has each send its round-1 update with the given loss. */
export async function federationWithOneRound(node: TestNode, id: string, rounds: number, owners: Record<string, { key: string; loss: number }>): Promise<void> {
  const adapter = { config: '{"peft_type":"LORA"}', tensors: { 'x.lora_A.weight': { shape: [2], data: encodeFloat32(Float32Array.from([1, 2])) } } };
  const names = Object.keys(owners);
  const federation: FederationCreate = {
    id, model: 'stories260K', mode: 'offsite', rounds, owners: names, sampleSize: names.length, minOwners: names.length, localSteps: 1,
    roundDeadlineSeconds: 60, aggregation: 'fedavg', secureAggregation: false, adapter,
  };
  const created = await api(node, 'POST', '/v1/federations', node.adminKey, federation);
  assert.equal(created.status, 201, JSON.stringify(created.json));
  for (const { key, loss } of Object.values(owners)) {
    const r = await api(node, 'POST', `/v1/federations/${id}/rounds/1/updates`, key, { attempt: 0, examples: 1, loss, values: encodeFloat32(Float32Array.from([0.5, 0.5])) });
    assert.equal(r.status, 200, JSON.stringify(r.json));
  }
}
