// POST /v1/models/:id/adapters/evaluate computes in a worker thread of its own: while it runs
// the node's thread answers REST and a bystander's training steps; one evaluation is bounded
// in tokens (before any compute) and in time (its worker stopped), and in the evaluations that
// may wait. Real nodes on loopback, the real stories260K model, a real LoRA adapter.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { before, describe, it } from 'node:test';
import { evaluateAdapter } from '../../cloud-node/adapter-evaluation.ts';
import { LlamaModel, createAdapter, loadModelFolder, loadTokenizer, saveAdapter, tf } from '../../model/index.ts';
import { STORIES_DIR, api, createTenantKey, metric, startTestNode, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';

let config = '';
let weights = '';
let contentHash = '';

before(async () => {
  const loaded = await loadModelFolder(STORIES_DIR);
  contentHash = `sha256:${loaded.contentHash}`;
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'] }], { seed: 1 });
  const dir = await tempDir();
  await saveAdapter(adapter, dir);
  adapter.dispose();
  model.dispose();
  config = await readFile(join(dir, 'adapter_config.json'), 'utf8');
  weights = (await readFile(join(dir, 'adapter_model.safetensors'))).toString('base64');
});

const STORY = 'Once upon a time, a little girl named Lily went to the park with her mom. She saw a big red ball and played with it all day. ';

function evaluate(node: TestNode, key: string, text: string, seqLen = 64, batchSize?: number): ReturnType<typeof api> {
  return api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', key, { baseContentHash: contentHash, adapter: { config, weights }, data: { name: 'eval.txt', text }, seqLen, ...(batchSize === undefined ? {} : { batchSize }) });
}

describe('adapter evaluation runs off the node\'s event loop, bounded', () => {
  it('while an evaluation computes, the node answers REST requests and a bystander\'s training steps', async () => {
    const node = await startTestNode();
    const good = await bystander(node);
    const key = await createTenantKey(node, 'owner');
    const loopBefore = performance.eventLoopUtilization();
    const evaluation = evaluate(node, key, STORY.repeat(40));
    for (let i = 0; i < 5; i++) assert.equal((await api(node, 'GET', '/v1/health')).status, 200);
    const res = await survives(node, good, () => evaluation);
    // The share of the evaluation's time the node's thread was busy (a ratio, not a duration):
    // computed on it, it is ~0.99; in the worker, ~0.01.
    const busy = performance.eventLoopUtilization(loopBefore).utilization;
    assert.equal(res.status, 200, JSON.stringify(res.json));
    assert.ok(busy < 0.5, `the node's thread was busy ${(busy * 100).toFixed(1)}% of the evaluation`);
    const plugIn = res.json.plugIn as { loss: number; tokens: number };
    assert.ok(Number.isFinite(plugIn.loss) && plugIn.tokens > 1000, JSON.stringify(plugIn));
  });

  it('computes what the model computes on the node\'s thread, and leaves no tensor behind there', async () => {
    const loaded = await loadModelFolder(STORIES_DIR);
    const base = { id: 'stories260K', config: loaded.config, model: LlamaModel.fromArrays(loaded.config, loaded.weights) };
    const tokenizer = await loadTokenizer(STORIES_DIR);
    const text = STORY.repeat(4);
    const files = { config, weights: new Uint8Array(Buffer.from(weights, 'base64')) };
    // The first fills the base model's own tables (rope, masks): measured from the second.
    const here = await evaluateAdapter(base, tokenizer, files, { name: 'eval.txt', text }, { seqLen: 32, batchSize: 8 });
    const tensors = tf.memory().numTensors;
    assert.deepEqual(await evaluateAdapter(base, tokenizer, files, { name: 'eval.txt', text }, { seqLen: 32, batchSize: 8 }), here);
    assert.equal(tf.memory().numTensors, tensors, 'an evaluation leaves no tensor behind');
    base.model.dispose();
    const node = await startTestNode();
    const key = await createTenantKey(node, 'owner');
    const there = await evaluate(node, key, text, 32);
    assert.equal(there.status, 200, JSON.stringify(there.json));
    const plugIn = there.json.plugIn as { loss: number };
    const baseline = there.json.baseline as { loss: number };
    assert.ok(Math.abs(plugIn.loss - here.plugIn.loss) < 1e-5, `worker ${plugIn.loss} vs this thread ${here.plugIn.loss}`);
    assert.ok(Math.abs(baseline.loss - here.baseline.loss) < 1e-5, `worker ${baseline.loss} vs this thread ${here.baseline.loss}`);
  });

  it('refuses data that makes more tokens than the limit before computing, naming it', async () => {
    const node = await startTestNode({ adapterEvaluation: { maxTokens: 1000 } });
    const key = await createTenantKey(node, 'owner');
    const over = await evaluate(node, key, STORY.repeat(40), 32);
    assert.equal(over.status, 400, JSON.stringify(over.json));
    assert.equal(over.json.code, 'TANDEM_EVAL_DATA_INVALID');
    assert.match(String(over.json.message), /tokens to run through the model .*the limit is 1000/);
    const small = await evaluate(node, key, STORY, 16);
    assert.equal(small.status, 200, JSON.stringify(small.json));
    // The same text in calls of one row of 2 tokens: each call counts as 128 tokens (found by fuzzing).
    const calls = await evaluate(node, key, STORY, 2, 1);
    assert.equal(calls.status, 400, JSON.stringify(calls.json));
    assert.match(String(calls.json.message), /calls of at least 128 tokens each\); the limit is 1000/);
  });

  it('stops an evaluation past its time limit with TANDEM_RESOURCE_EXHAUSTED; the node goes on and the next one gets a fresh worker', async () => {
    const node = await startTestNode({ adapterEvaluation: { timeoutMs: 1 } });
    const good = await bystander(node);
    const key = await createTenantKey(node, 'owner');
    const res = await survives(node, good, () => evaluate(node, key, STORY.repeat(100)));
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_RESOURCE_EXHAUSTED');
    assert.match(String(res.json.message), /more time than this node allows: the evaluation computed for more than 1 ms/);
    const again = await evaluate(node, key, STORY.repeat(100));
    assert.equal(again.json.code, 'TANDEM_RESOURCE_EXHAUSTED', 'a fresh worker computes (and is stopped) again');
    assert.equal(await metric(node, 'tandem_adapter_evaluation_worker_stops_total'), 2);
  });

  it('refuses evaluations on a model larger than the worker may copy, naming the limit', async () => {
    const node = await startTestNode({ adapterEvaluation: { maxModelBytes: 1000 } });
    const key = await createTenantKey(node, 'owner');
    const res = await evaluate(node, key, STORY, 16);
    assert.equal(res.status, 400, JSON.stringify(res.json));
    assert.equal(res.json.code, 'TANDEM_FEATURE_UNSUPPORTED');
    assert.match(String(res.json.message), /adapterEvaluation\.maxModelBytes is 1000/);
  });

  it('answers 503 TANDEM_EVAL_BUSY past the evaluations that may wait, and evaluates the rest', async () => {
    const node = await startTestNode({ adapterEvaluation: { maxWaiting: 1 } });
    const key = await createTenantKey(node, 'owner');
    const keys = [key, await createTenantKey(node, 'second'), await createTenantKey(node, 'third')];
    // The three arrive together, while the first one's worker is still starting: short texts suffice.
    const results = await Promise.all(keys.map((k) => evaluate(node, k, STORY.repeat(4))));
    const statuses = results.map((r) => r.status).sort();
    assert.deepEqual(statuses, [200, 200, 503], JSON.stringify(results.map((r) => r.json)));
    const busy = results.find((r) => r.status === 503);
    assert.equal(busy?.json.code, 'TANDEM_EVAL_BUSY');
    assert.match(String(busy?.json.message), /1 evaluations are waiting, the limit of 1/);
    const [a, b] = results.filter((r) => r.status === 200);
    assert.deepEqual(a.json, b.json, 'the same request evaluates alike, whichever waited');
  });
});
