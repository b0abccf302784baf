// Finding 2 of issue 9: a ~28 KB adapters/evaluate request whose adapter_config.json states a
// huge LoRA rank (with the real small weights) allocated gigabytes before the weights were
// checked and left the backend broken for every tenant. The stated sizes are now checked
// against the weights and a limit before anything is allocated; errors name no temporary path.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { LlamaModel, createAdapter, loadModelFolder, saveAdapter } from '../../model/index.ts';
import { STORIES_DIR, api, createTenantKey, startTestNode, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

let node: TestNode;
let good: Bystander;
let key = '';
let contentHash = '';
let config: Record<string, unknown> = {};
let weights = '';

before(async () => {
  node = await startTestNode();
  good = await bystander(node);
  key = await createTenantKey(node, 'mallory');
  contentHash = good.client.welcome?.model.contentHash ?? '';
  const loaded = await loadModelFolder(STORIES_DIR);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'] }], { seed: 1 });
  const dir = await tempDir();
  await saveAdapter(adapter, dir);
  adapter.dispose();
  model.dispose();
  config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  weights = (await readFile(join(dir, 'adapter_model.safetensors'))).toString('base64');
});

function evaluate(adapterConfig: Record<string, unknown> | string): ReturnType<typeof api> {
  return api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', key, {
    baseContentHash: contentHash,
    adapter: { config: typeof adapterConfig === 'string' ? adapterConfig : JSON.stringify(adapterConfig), weights },
    data: { name: 'eval.txt', text: 'The cat sat on the mat. '.repeat(8) },
    seqLen: 16,
  });
}

describe('finding 2: an adapter\'s config is checked against its weights before anything is allocated', () => {
  it('the real small weights with r = 1,000,000 get 400 TANDEM_ADAPTER_TOO_LARGE naming r and the limit', async () => {
    const res = await survives(node, good, () => evaluate({ ...config, r: 1_000_000 }));
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_ADAPTER_TOO_LARGE');
    assert.match(String(res.json.message), /r = 1000000, over the limit of/);
  });

  it('a rank within the limit that no tensor has gets 400 TANDEM_ADAPTER_INVALID; so does a huge rank_pattern entry', async () => {
    const res = await survives(node, good, () => evaluate({ ...config, r: 3 }));
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_ADAPTER_INVALID');
    assert.match(String(res.json.message), /r = 3, which is no dimension of any tensor/);
    const pattern = await evaluate({ ...config, rank_pattern: { q_proj: 50_000 } });
    assert.equal(pattern.status, 400);
    assert.equal(pattern.json.code, 'TANDEM_ADAPTER_TOO_LARGE');
  });

  it('an oversized adapter_config.json gets 400 TANDEM_ADAPTER_TOO_LARGE', async () => {
    const res = await survives(node, good, () => evaluate(JSON.stringify({ ...config, padding: 'x'.repeat(100_000) })));
    assert.equal(res.status, 400);
    assert.equal(res.json.code, 'TANDEM_ADAPTER_TOO_LARGE');
  });

  it('the same weights with their own rank are evaluated, and a refused adapter\'s error names no temporary path', async () => {
    const ok = await survives(node, good, () => evaluate(config));
    assert.equal(ok.status, 200, JSON.stringify(ok.json));
    const refused = await evaluate({ ...config, lora_alpha: 'sixteen' });
    assert.equal(refused.status, 400, JSON.stringify(refused.json));
    assert.equal(refused.json.code, 'TANDEM_ADAPTER_INVALID');
    assert.ok(!String(refused.json.message).includes(tmpdir()), String(refused.json.message));
  });
});
