// Serving on ONNX Runtime through a real node's OpenAI API (--engine ort-cpu): greedy tokens in
// batches mixing 4 adapters and prompt lengths equal what `tandem generate --adapter DIR
// --engine ort-cpu --temperature 0` computes (the adapter merged, generateOrt), and streaming
// gives the same text as non-streaming.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, createAdapter, generateOrt, saveAdapter, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, mergedWeightArrays, OrtLlama } from '../../model/index.ts';
import type { LoadedModel, Tokenizer } from '../../model/index.ts';
import { api, createTenantKey, startTestNode, STORIES_DIR, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { writeTestAdapters } from './serving-fixtures.ts';

let node: TestNode;
let alice: string;
let dirs: string[];
let tokenizer: Tokenizer;
let loaded: LoadedModel;
let model: LlamaModel;

/** What `tandem generate --adapter DIR --engine ort-cpu --temperature 0` computes. */
async function expectedIds(prompt: string, dir: string | undefined, maxNewTokens: number): Promise<number[]> {
  const adapter = dir === undefined ? undefined : await loadAdapter(model, dir);
  try {
    const merged = adapter === undefined ? { weights: loaded.weights } : mergedWeightArrays(model, adapter);
    assert.ok(merged.weights, merged.reason);
    const engine = await OrtLlama.create(loaded.config, merged.weights, { threads: 1 });
    try {
      return (await generateOrt(engine, tokenizer.encode(prompt), { maxNewTokens, temperature: 0 })).generatedIds;
    } finally {
      await engine.dispose();
    }
  } finally {
    adapter?.dispose();
  }
}

before(async () => {
  await initBackend({ backend: 'wasm' });
  dirs = await writeTestAdapters(await tempDir(), 4);
  node = await startTestNode({ engine: 'ort-cpu', computeWorkers: 1, serving: { maxBatch: 16 } });
  alice = await createTenantKey(node, 'alice');
  const models = await api(node, 'GET', '/v1/models', alice);
  const contentHash = ((models.json.models as Record<string, unknown>[])[0]).contentHash as string;
  tokenizer = await loadTokenizer(STORIES_DIR);
  loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  for (let i = 0; i < 4; i++) {
    const r = await api(node, 'POST', '/v1/adapters', alice, {
      name: `a${i}`, baseContentHash: contentHash,
      adapter: { config: await readFile(join(dirs[i], ADAPTER_CONFIG_FILE), 'utf8'), weights: (await readFile(join(dirs[i], ADAPTER_WEIGHTS_FILE))).toString('base64') },
    });
    assert.equal(r.status, 201, JSON.stringify(r.json));
  }
});

after(() => model.dispose());

describe('adapter serving on ONNX Runtime', () => {
  it('greedy tokens equal generate --engine ort-cpu with the same adapter, in batches mixing 4 adapters and prompt lengths', async () => {
    const prompts = ['Once upon a time', 'The little dog ran to the', 'Lily', 'One day, a girl named Sue went to the park with her mom'];
    const cases = prompts.flatMap((prompt, i) => [0, 1, 2, 3].map((k) => ({ prompt, adapter: (i + k) % 4, maxTokens: 6 + ((i * 4 + k) % 5) })));
    cases.push({ prompt: 'Once upon a time', adapter: -1, maxTokens: 12 });
    const replies = await Promise.all(cases.map((c) => api(node, 'POST', '/v1/completions', alice, { model: c.adapter < 0 ? 'stories260K' : `stories260K:a${c.adapter}`, prompt: c.prompt, max_tokens: c.maxTokens, temperature: 0 })));
    for (const [i, c] of cases.entries()) {
      assert.equal(replies[i].status, 200, JSON.stringify(replies[i].json));
      const want = await expectedIds(c.prompt, c.adapter < 0 ? undefined : dirs[c.adapter], c.maxTokens);
      assert.deepEqual((replies[i].json.choices as Record<string, unknown>[])[0].token_ids, want, `case ${i}: adapter a${c.adapter}, "${c.prompt}"`);
    }
    const ids = replies.map((r) => JSON.stringify((r.json.choices as Record<string, unknown>[])[0].token_ids));
    assert.ok(new Set(ids.slice(0, 4)).size > 1, 'different adapters give different tokens for one prompt');
    const metrics = Buffer.from((await api(node, 'GET', '/metrics')).bytes).toString('utf8');
    const sum = Number(/^tandem_serve_batch_rows_sum (\S+)$/m.exec(metrics)?.[1]);
    const count = Number(/^tandem_serve_batch_rows_count (\S+)$/m.exec(metrics)?.[1]);
    assert.ok(sum > count, `batched steps held several requests (rows ${sum} over ${count} steps)`);
  });

  it('refuses an adapter the ORT graph cannot run (DoRA) with a typed 400, and keeps serving', async () => {
    const dir = join(await tempDir(), 'dora');
    const dora = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 16, initLoraWeights: false, useDora: true, targetModules: ['q_proj'] }], { seed: 3 });
    await saveAdapter(dora, dir, { baseModel: 'stories260K' });
    dora.dispose();
    const models = await api(node, 'GET', '/v1/models', alice);
    const up = await api(node, 'POST', '/v1/adapters', alice, {
      name: 'dora', baseContentHash: ((models.json.models as Record<string, unknown>[])[0]).contentHash,
      adapter: { config: await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8'), weights: (await readFile(join(dir, ADAPTER_WEIGHTS_FILE))).toString('base64') },
    });
    assert.equal(up.status, 201, JSON.stringify(up.json));
    const r = await api(node, 'POST', '/v1/completions', alice, { model: 'stories260K:dora', prompt: 'Once', max_tokens: 4, temperature: 0 });
    assert.equal(r.status, 400, JSON.stringify(r.json));
    const error = r.json.error as { code: string; message: string; param: string };
    assert.equal(error.code, 'TANDEM_SERVE_ADAPTER_UNSUPPORTED');
    assert.match(error.message, /DoRA/);
    assert.equal(error.param, 'model');
    const ok = await api(node, 'POST', '/v1/completions', alice, { model: 'stories260K:a0', prompt: 'Once', max_tokens: 4, temperature: 0 });
    assert.equal(ok.status, 200);
  });

  it('streams the same text as it answers without streaming', async () => {
    const body = { model: 'stories260K:a1', prompt: 'Once upon a time', max_tokens: 24, temperature: 0 };
    const whole = await api(node, 'POST', '/v1/completions', alice, body);
    assert.equal(whole.status, 200, JSON.stringify(whole.json));
    const text = (whole.json.choices as { text: string }[])[0].text;
    const response = await fetch(`${node.url}/v1/completions`, { method: 'POST', headers: { authorization: `Bearer ${alice}`, 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
    const events = (await response.text()).split('\n\n').filter((e) => e.length > 0).map((e) => e.slice('data: '.length));
    assert.equal(events.at(-1), '[DONE]');
    const streamed = events.slice(0, -1).map((e) => (JSON.parse(e) as { choices: { text: string }[] }).choices[0].text).join('');
    assert.ok(text.length > 0);
    assert.equal(streamed, text);
  });
});
