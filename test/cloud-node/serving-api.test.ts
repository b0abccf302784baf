// The OpenAI-compatible API of a real node on loopback: adapters uploaded per tenant, greedy
// tokens through the API equal to generate() with the same adapter in batches that mix four
// adapters, streaming equal to non-streaming, the `openai` client, and each bad input's error.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import OpenAI from 'openai';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, generate, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer } from '../../model/index.ts';
import type { Tokenizer } from '../../model/index.ts';
import { api, createTenantKey, metric, startTestNode, STORIES_DIR, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { writeTestAdapters } from './serving-fixtures.ts';
import { TFJS_PREFILL_TOKENS_PER_STEP } from '../../cloud-node/serving/serving.ts';

let node: TestNode;
let alice: string;
let bob: string;
let dirs: string[];
let contentHash: string;
let tokenizer: Tokenizer;
let model: LlamaModel;

async function upload(key: string, name: string, dir: string, extra: Record<string, unknown> = {}) {
  return api(node, 'POST', '/v1/adapters', key, {
    name, baseContentHash: contentHash, ...extra,
    adapter: { config: await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8'), weights: (await readFile(join(dir, ADAPTER_WEIGHTS_FILE))).toString('base64') },
  });
}

/** What `tandem generate --adapter DIR --temperature 0` computes (its tfjs path). */
async function expectedIds(prompt: string, dir: string | undefined, maxNewTokens: number): Promise<number[]> {
  const adapter = dir === undefined ? undefined : await loadAdapter(model, dir);
  try {
    return generate(model, tokenizer.encode(prompt), { maxNewTokens, temperature: 0, hooks: adapter?.hooks }).generatedIds;
  } finally {
    adapter?.dispose();
  }
}

function complete(key: string, body: Record<string, unknown>) {
  return api(node, 'POST', '/v1/completions', key, { temperature: 0, ...body });
}

/** The `data:` events of a server-sent event stream. */
async function streamEvents(path: string, key: string, body: Record<string, unknown>): Promise<string[]> {
  const response = await fetch(`${node.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/event-stream/);
  const text = await response.text();
  return text.split('\n\n').filter((e) => e.length > 0).map((e) => {
    assert.ok(e.startsWith('data: '), e);
    return e.slice('data: '.length);
  });
}

before(async () => {
  await initBackend({ backend: 'wasm' });
  dirs = await writeTestAdapters(await tempDir(), 4);
  node = await startTestNode({ serving: { maxBatch: 16 }, tenantQuotas: { bob: { servedAdapters: 1 }, carol: { servedAdapters: 2 } } });
  alice = await createTenantKey(node, 'alice');
  bob = await createTenantKey(node, 'bob');
  const models = await api(node, 'GET', '/v1/models', alice);
  contentHash = ((models.json.models as Record<string, unknown>[])[0]).contentHash as string;
  tokenizer = await loadTokenizer(STORIES_DIR);
  const loaded = await loadModelFolder(STORIES_DIR);
  model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  for (let i = 0; i < 4; i++) {
    const r = await upload(alice, `a${i}`, dirs[i], { shared: i === 3 });
    assert.equal(r.status, 201, JSON.stringify(r.json));
  }
});

after(() => model.dispose());

describe('adapter serving through the OpenAI API', () => {
  it('lists the base and the adapters each tenant may use as base:adapter', async () => {
    const a = await api(node, 'GET', '/v1/models', alice);
    assert.equal(a.json.object, 'list');
    assert.deepEqual((a.json.data as { id: string }[]).map((m) => m.id), ['stories260K', 'stories260K:a0', 'stories260K:a1', 'stories260K:a2', 'stories260K:a3']);
    const b = await api(node, 'GET', '/v1/models', bob);
    assert.deepEqual((b.json.data as { id: string }[]).map((m) => m.id), ['stories260K', 'stories260K:alice/a3']);
    const list = await api(node, 'GET', '/v1/adapters', bob);
    assert.deepEqual((list.json.adapters as { model: string; shared: boolean }[]).map((x) => [x.model, x.shared]), [['stories260K:alice/a3', true]]);
  });

  it('on tfjs, whose steps run on the event loop, a long prompt runs in steps of at most TFJS_PREFILL_TOKENS_PER_STEP tokens, with the same tokens', async () => {
    const prompt = 'Once upon a time there was a little girl named Lily. '.repeat(8);
    const ids = tokenizer.encode(prompt);
    const steps = async (): Promise<number> => metric(node, 'tandem_serve_step_seconds_count');
    const before = await steps();
    const r = await complete(alice, { model: 'stories260K', prompt, max_tokens: 2, ignore_eos: true });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    const taken = (await steps()) - before;
    assert.ok(taken >= Math.ceil(ids.length / TFJS_PREFILL_TOKENS_PER_STEP) + 1, `${taken} steps for ${ids.length} prompt tokens and 2 generated`);
    const want = generate(model, ids, { maxNewTokens: 2, temperature: 0, stopTokenIds: [] }).generatedIds;
    assert.equal((r.json.choices as { text: string }[])[0].text, tokenizer.decode(want, { skipSpecialTokens: true }));
  });

  it('greedy tokens equal generate() with the same adapter, in batches mixing 4 adapters and prompt lengths', async () => {
    const prompts = ['Once upon a time', 'The little dog ran to the', 'Lily', 'One day, a girl named Sue went to the park with her mom'];
    const cases = prompts.flatMap((prompt, i) => [0, 1, 2, 3].map((k) => ({ prompt, adapter: (i + k) % 4, maxTokens: 6 + ((i * 4 + k) % 5) })));
    cases.push({ prompt: 'Once upon a time', adapter: -1, maxTokens: 12 });
    const replies = await Promise.all(cases.map((c) => complete(alice, { model: c.adapter < 0 ? 'stories260K' : `stories260K:a${c.adapter}`, prompt: c.prompt, max_tokens: c.maxTokens })));
    for (const [i, c] of cases.entries()) {
      assert.equal(replies[i].status, 200, JSON.stringify(replies[i].json));
      const choice = (replies[i].json.choices as Record<string, unknown>[])[0];
      const want = await expectedIds(c.prompt, c.adapter < 0 ? undefined : dirs[c.adapter], c.maxTokens);
      assert.deepEqual(choice.token_ids, want, `case ${i}: adapter a${c.adapter}, "${c.prompt}"`);
      assert.equal(replies[i].json.object, 'text_completion');
      assert.equal((replies[i].json.usage as Record<string, number>).completion_tokens, want.length);
    }
    const ids = replies.map((r) => JSON.stringify((r.json.choices as Record<string, unknown>[])[0].token_ids));
    assert.ok(new Set(ids.slice(0, 4)).size > 1, 'different adapters give different tokens for one prompt');
    // Requests ran together: some batched step held more than one request.
    const metrics = Buffer.from((await api(node, 'GET', '/metrics')).bytes).toString('utf8');
    const sum = Number(/^tandem_serve_batch_rows_sum (\S+)$/m.exec(metrics)?.[1]);
    const count = Number(/^tandem_serve_batch_rows_count (\S+)$/m.exec(metrics)?.[1]);
    assert.ok(sum > count, `batched steps held several requests (rows ${sum} over ${count} steps)`);
    for (const name of ['tandem_serve_time_to_first_token_seconds_count', 'tandem_serve_inter_token_seconds_count', 'tandem_serve_resident_adapters', 'tandem_serve_kv_cache_bytes', 'tandem_serve_deadline_misses_total', 'tandem_serve_tokens_total']) {
      assert.match(metrics, new RegExp(`^${name} `, 'm'));
    }
  });

  it('streams the same text as it answers without streaming, ending with data: [DONE]', async () => {
    for (const [path, body] of [
      ['/v1/completions', { model: 'stories260K:a1', prompt: 'Once upon a time', max_tokens: 24, temperature: 0 }],
      ['/v1/chat/completions', { model: 'stories260K:a2', messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 24, temperature: 0 }],
    ] as const) {
      const whole = await api(node, 'POST', path, alice, body);
      assert.equal(whole.status, 200, JSON.stringify(whole.json));
      const choice = (whole.json.choices as Record<string, unknown>[])[0];
      const expected = path === '/v1/completions' ? choice.text : (choice.message as { content: string }).content;
      const events = await streamEvents(path, alice, { ...body, stream: true });
      assert.equal(events.at(-1), '[DONE]');
      const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { choices: { text?: string; delta?: { content?: string }; finish_reason: string | null }[] });
      const streamed = chunks.map((c) => c.choices[0].text ?? c.choices[0].delta?.content ?? '').join('');
      assert.ok((expected as string).length > 0);
      assert.equal(streamed, expected);
      assert.equal(chunks.at(-1)?.choices[0].finish_reason, choice.finish_reason);
    }
  });

  it('the openai npm client calls the node with and without streaming', async () => {
    const client = new OpenAI({ baseURL: `${node.url}/v1`, apiKey: alice });
    const listed = await client.models.list();
    assert.ok(listed.data.some((m) => m.id === 'stories260K:a0'));
    const c = await client.completions.create({ model: 'stories260K:a0', prompt: 'Once upon a time', max_tokens: 12, temperature: 0 });
    assert.equal(c.object, 'text_completion');
    let streamed = '';
    for await (const part of await client.completions.create({ model: 'stories260K:a0', prompt: 'Once upon a time', max_tokens: 12, temperature: 0, stream: true })) streamed += part.choices[0]?.text ?? '';
    assert.equal(streamed, c.choices[0].text);
    const chat = await client.chat.completions.create({ model: 'stories260K:a3', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 12, temperature: 0 });
    assert.equal(chat.choices[0].message.role, 'assistant');
    let chatStreamed = '';
    for await (const part of await client.chat.completions.create({ model: 'stories260K:a3', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 12, temperature: 0, stream: true })) chatStreamed += part.choices[0]?.delta?.content ?? '';
    assert.equal(chatStreamed, chat.choices[0].message.content);
    // Bob uses alice's shared adapter under its owner's name; the client reads a 404 as NotFoundError.
    const shared = await new OpenAI({ baseURL: `${node.url}/v1`, apiKey: bob }).completions.create({ model: 'stories260K:alice/a3', prompt: 'Once', max_tokens: 4, temperature: 0 });
    assert.equal(shared.choices.length, 1);
    await assert.rejects(new OpenAI({ baseURL: `${node.url}/v1`, apiKey: bob }).completions.create({ model: 'stories260K:a0', prompt: 'Once', max_tokens: 4 }), (err: unknown) => err instanceof OpenAI.NotFoundError && (err.error as { code?: string }).code === 'TANDEM_SERVE_MODEL_UNKNOWN');
  });

  it('seeded sampling gives the same tokens for the same seed', async () => {
    const body = { model: 'stories260K:a1', prompt: 'Once upon a time', max_tokens: 16, temperature: 0.9, top_p: 0.9 };
    const [x, y, z] = await Promise.all([complete(alice, { ...body, seed: 7 }), complete(alice, { ...body, seed: 7 }), complete(alice, { ...body, seed: 8 })]);
    const ids = (r: typeof x) => (r.json.choices as Record<string, unknown>[])[0].token_ids;
    assert.deepEqual(ids(x), ids(y));
    assert.notDeepEqual(ids(x), ids(z));
  });

  it('a stop sequence ends the text before it', async () => {
    const free = await complete(alice, { model: 'stories260K:a0', prompt: 'Once upon a time', max_tokens: 24 });
    const text = (free.json.choices as { text: string }[])[0].text;
    const word = text.trim().split(/\s+/)[2];
    const cut = await complete(alice, { model: 'stories260K:a0', prompt: 'Once upon a time', max_tokens: 24, stop: [word] });
    const choice = (cut.json.choices as { text: string; finish_reason: string }[])[0];
    assert.equal(choice.text, text.slice(0, text.indexOf(word)));
    assert.equal(choice.finish_reason, 'stop');
  });

  it('each bad input gets its typed error in OpenAI\'s shape, and the node stays up', async () => {
    const cases: [string, string, unknown, number, string, string | null][] = [
      ['unknown adapter', alice, { model: 'stories260K:nope', prompt: 'x' }, 404, 'TANDEM_SERVE_MODEL_UNKNOWN', 'model'],
      ['another tenant\'s private adapter', bob, { model: 'stories260K:a0', prompt: 'x' }, 404, 'TANDEM_SERVE_MODEL_UNKNOWN', 'model'],
      ['another tenant\'s private adapter by owner', bob, { model: 'stories260K:alice/a0', prompt: 'x' }, 404, 'TANDEM_SERVE_MODEL_UNKNOWN', 'model'],
      ['unknown base', alice, { model: 'gpt-4', prompt: 'x' }, 404, 'TANDEM_SERVE_MODEL_UNKNOWN', 'model'],
      ['prompt longer than the context', alice, { model: 'stories260K', prompt: 'Once upon a time '.repeat(200) }, 400, 'TANDEM_SERVE_PROMPT_TOO_LONG', 'prompt'],
      ['prompt of 900 KB, refused before it is tokenized', alice, { model: 'stories260K', prompt: 'Once upon a time '.repeat(53_000) }, 400, 'TANDEM_SERVE_PROMPT_TOO_LONG', 'prompt'],
      ['max_tokens past the context', alice, { model: 'stories260K', prompt: 'Once', max_tokens: 600 }, 400, 'TANDEM_SERVE_MAX_TOKENS_TOO_LARGE', 'max_tokens'],
      ['temperature out of range', alice, { model: 'stories260K', prompt: 'Once', temperature: 5 }, 400, 'TANDEM_REQUEST_INVALID', 'temperature'],
      ['too many stop sequences', alice, { model: 'stories260K', prompt: 'Once', stop: ['a', 'b', 'c', 'd', 'e'] }, 400, 'TANDEM_REQUEST_INVALID', 'stop'],
    ];
    for (const [what, key, body, status, code, param] of cases) {
      const r = await api(node, 'POST', '/v1/completions', key, body);
      assert.equal(r.status, status, `${what}: ${JSON.stringify(r.json)}`);
      const error = r.json.error as Record<string, unknown>;
      assert.equal(error.code, code, what);
      assert.equal(error.param, param, what);
      assert.equal(typeof error.message, 'string');
      assert.equal(typeof error.type, 'string');
      if (what.startsWith('prompt of 900 KB')) assert.match(error.message as string, /the prompt holds 901000 characters; at most \d+ characters/);
    }
    const malformed = await fetch(`${node.url}/v1/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${alice}`, 'content-type': 'application/json' }, body: '{"model": "stories260K", "messages": [' });
    assert.equal(malformed.status, 400);
    assert.equal(((await malformed.json()) as { error: { code: string } }).error.code, 'TANDEM_REQUEST_INVALID');
    const xml = await fetch(`${node.url}/v1/completions`, { method: 'POST', headers: { authorization: `Bearer ${alice}`, 'content-type': 'application/xml' }, body: '<a/>' });
    assert.equal(xml.status, 415);
    assert.deepEqual((({ code, type }) => ({ code, type }))(((await xml.json()) as { error: { code: string; type: string } }).error), { code: 'TANDEM_REQUEST_INVALID', type: 'invalid_request_error' });
    const noKey = await api(node, 'POST', '/v1/completions', undefined, { model: 'stories260K', prompt: 'x' });
    assert.equal(noKey.status, 401);
    assert.equal((noKey.json.error as Record<string, unknown>).code, 'TANDEM_AUTH_KEY_MISSING');
    assert.equal((await api(node, 'GET', '/v1/health')).status, 200);
    assert.equal((await complete(alice, { model: 'stories260K:a0', prompt: 'Once', max_tokens: 3 })).status, 200);
  });

  it('an adapter whose logits are not finite (lora_alpha 1e308) ends its request with TANDEM_LOGITS_NON_FINITE; a request batched with it goes on (found by fuzzing)', async () => {
    const config = JSON.parse(await readFile(join(dirs[0], ADAPTER_CONFIG_FILE), 'utf8')) as Record<string, unknown>;
    const r = await api(node, 'POST', '/v1/adapters', bob, {
      name: 'huge', baseContentHash: contentHash,
      adapter: { config: JSON.stringify({ ...config, lora_alpha: 1e308 }), weights: (await readFile(join(dirs[0], ADAPTER_WEIGHTS_FILE))).toString('base64') },
    });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    try {
      const [huge, base] = await Promise.all([
        complete(bob, { model: 'stories260K:huge', prompt: 'Once', max_tokens: 5 }),
        complete(bob, { model: 'stories260K', prompt: 'Once upon', max_tokens: 5 }),
      ]);
      assert.equal(huge.status, 422, JSON.stringify(huge.json));
      const error = huge.json.error as Record<string, unknown>;
      assert.equal(error.code, 'TANDEM_LOGITS_NON_FINITE');
      assert.match(error.message as string, /adapter huge for generated token 0/);
      assert.equal(base.status, 200, JSON.stringify(base.json));
      assert.deepEqual((base.json.choices as Record<string, unknown>[])[0].token_ids, await expectedIds('Once upon', undefined, 5), 'the base request batched with it gets its own tokens');
    } finally {
      assert.equal((await api(node, 'DELETE', '/v1/adapters/huge', bob)).status, 200);
    }
  });

  it('a refusal the scheduler knows at once is an HTTP error with streaming too, not a 200 and an error event', async () => {
    const tight = await startTestNode({ serving: { kvBudgetBytes: 1024 } });
    try {
      const key = await createTenantKey(tight, 'carol');
      for (const stream of [false, true]) {
        const r = await fetch(`${tight.url}/v1/completions`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify({ model: 'stories260K', prompt: 'Once upon a time', max_tokens: 8, stream }) });
        assert.equal(r.status, 400, `stream ${stream}`);
        assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'TANDEM_RESOURCE_EXHAUSTED', `stream ${stream}`);
      }
    } finally {
      await tight.close();
    }
  });

  it('uploads are validated: base content hash, name clash, another tenant\'s name space, quotas; delete makes the name unknown', async () => {
    const wrongBase = await upload(bob, 'x', dirs[0], { baseContentHash: 'sha256:' + '0'.repeat(64) });
    assert.equal(wrongBase.status, 409);
    assert.equal(wrongBase.json.code, 'TANDEM_ADAPTER_BASE_MISMATCH');
    const clash = await upload(alice, 'a0', dirs[1]);
    assert.equal(clash.json.code, 'TANDEM_SERVE_ADAPTER_EXISTS');
    const badWeights = await api(node, 'POST', '/v1/adapters', bob, { name: 'bad', baseContentHash: contentHash, adapter: { config: await readFile(join(dirs[0], ADAPTER_CONFIG_FILE), 'utf8'), weights: Buffer.from('not safetensors').toString('base64') } });
    assert.equal(badWeights.status, 400);
    assert.equal(badWeights.json.code, 'TANDEM_ADAPTER_INVALID');
    // Bob's own "a0" is his, not alice's.
    assert.equal((await upload(bob, 'a0', dirs[2])).status, 201);
    const over = await upload(bob, 'b1', dirs[1]);
    assert.equal(over.status, 429);
    assert.deepEqual([over.json.code, (over.json.details as Record<string, unknown>).quota], ['TANDEM_QUOTA_EXCEEDED', 'servedAdapters']);
    const bobs = await complete(bob, { model: 'stories260K:a0', prompt: 'Once upon a time', max_tokens: 8 });
    assert.deepEqual((bobs.json.choices as Record<string, unknown>[])[0].token_ids, await expectedIds('Once upon a time', dirs[2], 8));
    const gone = await api(node, 'DELETE', '/v1/adapters/a0', bob);
    assert.equal(gone.status, 200);
    assert.equal((await complete(bob, { model: 'stories260K:a0', prompt: 'Once', max_tokens: 2 })).status, 404);
    assert.equal((await api(node, 'DELETE', '/v1/adapters/a1', bob)).status, 404, 'bob cannot delete alice\'s adapter');
  });

  it('concurrent uploads are counted against the quota together, and one name is taken once', async () => {
    const carol = await createTenantKey(node, 'carol');
    const names = ['c0', 'c1', 'c2', 'c3', 'c1'];
    const replies = await Promise.all(names.map((name, i) => upload(carol, name, dirs[i % 4])));
    const kept = replies.filter((r) => r.status === 201).map((r) => r.json.name as string);
    const refusals = replies.filter((r) => r.status !== 201).map((r) => r.json.code as string);
    assert.equal(kept.length, 2, `2 kept under a quota of 2: ${JSON.stringify(replies.map((r) => r.json))}`);
    assert.equal(new Set(kept).size, 2);
    assert.ok(refusals.every((c) => c === 'TANDEM_QUOTA_EXCEEDED' || c === 'TANDEM_SERVE_ADAPTER_EXISTS'), refusals.join());
    const own = ((await api(node, 'GET', '/v1/adapters', carol)).json.adapters as { model: string }[]).map((a) => a.model).filter((m) => !m.includes('/'));
    assert.deepEqual(own.sort(), kept.map((n) => `stories260K:${n}`).sort());
    // The same name at once, under the quota: one is kept, the other is told it exists.
    for (const name of kept) assert.equal((await api(node, 'DELETE', `/v1/adapters/${name}`, carol)).status, 200);
    const same = await Promise.all([upload(carol, 'twice', dirs[0]), upload(carol, 'twice', dirs[1])]);
    assert.deepEqual(same.map((r) => r.status).sort(), [201, 409], JSON.stringify(same.map((r) => r.json)));
    assert.equal(same.find((r) => r.status === 409)?.json.code, 'TANDEM_SERVE_ADAPTER_EXISTS');
  });

  it('answers /v1/health while it generates', async () => {
    const long = complete(alice, { model: 'stories260K:a2', prompt: 'Once', max_tokens: 100 });
    let done = false;
    void long.then(() => { done = true; });
    await new Promise((r) => setTimeout(r, 20));
    const health = await api(node, 'GET', '/v1/health');
    assert.equal(health.status, 200);
    const finishedBeforeHealth = done;
    assert.equal((await long).status, 200);
    assert.equal(finishedBeforeHealth, false, 'the health check answered before the generation ended');
  });
});
