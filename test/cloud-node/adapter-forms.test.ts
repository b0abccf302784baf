// The adapter routes take multipart/form-data (the files as they are, streamed) besides JSON
// with base64 weights (now at most 4 MiB): a form uploads and evaluates exactly what the JSON
// body does, and every part is named and bounded. A real node on loopback, real PEFT folders,
// forms built by the platform's FormData and sent by fetch.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MAX_ADAPTER_TENSORS, serializeSafetensors } from '../../model/index.ts';
import { api, createTenantKey, startTestNode, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { writeTestAdapters } from './serving-fixtures.ts';

let node: TestNode;
let alice = '';
let small = '';
let contentHash = '';
let config = '';
let weights: Buffer;

const TEXT = 'Once upon a time, a little girl named Lily went to the park with her mom. She saw a big red ball.\n'.repeat(4);

before(async () => {
  const [dir] = await writeTestAdapters(await tempDir(), 1);
  config = await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8');
  weights = await readFile(join(dir, ADAPTER_WEIGHTS_FILE));
  node = await startTestNode({ tenantQuotas: { small: { servedAdapterBytes: 1024 }, uploader: { servedAdapters: 64 } }, maxAdapterRequestBytes: 8 * 1024 * 1024, serving: { maxUploadBytes: 8 * 1024 * 1024 } });
  alice = await createTenantKey(node, 'alice');
  small = await createTenantKey(node, 'small');
  contentHash = ((await api(node, 'GET', '/v1/models', alice)).json.models as { contentHash: string }[])[0].contentHash;
});

type Part = [name: string, value: string | Uint8Array, fileName?: string];

async function postForm(path: string, key: string, parts: Part[]): Promise<{ status: number; json: Record<string, unknown> }> {
  return postFormTo(node, path, key, parts);
}

async function postFormTo(to: TestNode, path: string, key: string, parts: Part[]): Promise<{ status: number; json: Record<string, unknown> }> {
  const form = new FormData();
  for (const [name, value, fileName] of parts) {
    if (typeof value === 'string' && fileName === undefined) form.append(name, value);
    else form.append(name, new Blob([value]), fileName ?? name);
  }
  const response = await fetch(`${to.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${key}` }, body: form });
  return { status: response.status, json: (await response.json()) as Record<string, unknown> };
}

const uploadParts = (name: string): Part[] => [['name', name], ['baseContentHash', contentHash], ['config', config, 'adapter_config.json'], ['weights', weights, 'adapter_model.safetensors']];
const evaluateParts = (): Part[] => [['baseContentHash', contentHash], ['seqLen', '16'], ['config', config, 'adapter_config.json'], ['weights', weights, 'adapter_model.safetensors'], ['data', TEXT, 'eval.txt']];

describe('adapter uploads and evaluations as multipart/form-data', () => {
  it('an adapter uploaded as a form is the one uploaded as JSON, and serves', async () => {
    const form = await postForm('/v1/adapters', alice, uploadParts('as-form'));
    assert.equal(form.status, 201, JSON.stringify(form.json));
    const json = await api(node, 'POST', '/v1/adapters', alice, { name: 'as-json', baseContentHash: contentHash, adapter: { config, weights: weights.toString('base64') } });
    assert.equal(json.status, 201, JSON.stringify(json.json));
    assert.equal(form.json.sha256, json.json.sha256);
    assert.equal(form.json.bytes, weights.byteLength);
    const completions = await Promise.all(['as-form', 'as-json'].map((name) => api(node, 'POST', '/v1/completions', alice, { model: `stories260K:${name}`, prompt: 'Once upon a time', max_tokens: 8, temperature: 0 })));
    for (const c of completions) assert.equal(c.status, 200, JSON.stringify(c.json));
    assert.deepEqual((completions[0].json.choices as { text: string }[])[0].text, (completions[1].json.choices as { text: string }[])[0].text);
    // config as a plain field (not a file) is taken too; shared as "true".
    const field = await postForm('/v1/adapters', alice, [['name', 'as-field'], ['shared', 'true'], ['baseContentHash', contentHash], ['config', config], ['weights', weights, 'w.safetensors']]);
    assert.equal(field.status, 201, JSON.stringify(field.json));
    assert.equal(field.json.shared, true);
  });

  it('an evaluation sent as a form equals the same sent as JSON', async () => {
    const form = await postForm('/v1/models/stories260K/adapters/evaluate', alice, evaluateParts());
    assert.equal(form.status, 200, JSON.stringify(form.json));
    const json = await api(node, 'POST', '/v1/models/stories260K/adapters/evaluate', alice, { baseContentHash: contentHash, seqLen: 16, adapter: { config, weights: weights.toString('base64') }, data: { name: 'eval.txt', text: TEXT } });
    assert.equal(json.status, 200, JSON.stringify(json.json));
    assert.deepEqual(form.json, json.json);
  });

  it('refuses unknown, repeated, missing and malformed parts with typed errors', async () => {
    const unknown = await postForm('/v1/adapters', alice, [...uploadParts('x1'), ['extra', 'y']]);
    assert.equal(unknown.status, 400);
    assert.equal(unknown.json.code, 'TANDEM_REQUEST_INVALID');
    assert.match(String(unknown.json.message), /a part "extra"; it takes name, baseContentHash, shared, config, weights/);
    const twice = await postForm('/v1/adapters', alice, [...uploadParts('x2'), ['name', 'again']]);
    assert.equal(twice.status, 400);
    assert.match(String(twice.json.message), /part "name" twice/);
    const noWeights = await postForm('/v1/adapters', alice, uploadParts('x3').filter(([n]) => n !== 'weights'));
    assert.equal(noWeights.status, 400);
    assert.match(String(noWeights.json.message), /no "weights" part/);
    const badShared = await postForm('/v1/adapters', alice, [...uploadParts('x4'), ['shared', 'yes']]);
    assert.equal(badShared.status, 400);
    assert.match(String(badShared.json.message), /shared must be true or false/);
    const badSeq = await postForm('/v1/models/stories260K/adapters/evaluate', alice, [...evaluateParts().filter(([n]) => n !== 'seqLen'), ['seqLen', '1e9']]);
    assert.equal(badSeq.status, 400);
    assert.match(String(badSeq.json.message), /seqLen must be an integer from 2/);
    const noData = await postForm('/v1/models/stories260K/adapters/evaluate', alice, evaluateParts().filter(([n]) => n !== 'data'));
    assert.equal(noData.status, 400);
    assert.match(String(noData.json.message), /no "data" part/);
    const tooMany = await postForm('/v1/adapters', alice, [...uploadParts('x5'), ...Array.from({ length: 20 }, (_, i): Part => [`f${i}`, 'v'])]);
    assert.equal(tooMany.status, 400);
    assert.equal(tooMany.json.code, 'TANDEM_REQUEST_INVALID');
    // Fields are checked as they arrive, before the files after them are read.
    const wrongBase = `sha256:${'0'.repeat(64)}`;
    const base = await postForm('/v1/adapters', alice, uploadParts('x9').map((p): Part => (p[0] === 'baseContentHash' ? ['baseContentHash', wrongBase] : p)));
    assert.equal(base.status, 409);
    assert.equal(base.json.code, 'TANDEM_ADAPTER_BASE_MISMATCH');
    const evalBase = await postForm('/v1/models/stories260K/adapters/evaluate', alice, evaluateParts().map((p): Part => (p[0] === 'baseContentHash' ? ['baseContentHash', wrongBase] : p)));
    assert.equal(evalBase.json.code, 'TANDEM_ADAPTER_BASE_MISMATCH');
    const badName = await postForm('/v1/adapters', alice, uploadParts('no spaces allowed'));
    assert.equal(badName.status, 400);
    assert.match(String(badName.json.message), /name must match/);
    const listed = (await api(node, 'GET', '/v1/adapters', alice)).json.adapters as { name: string }[];
    assert.deepEqual(listed.map((a) => a.name).filter((n) => n.startsWith('x')), [], 'nothing refused was stored');
  });

  it('refuses a body that is neither JSON nor a form, and no body at all, with TANDEM_REQUEST_INVALID', async () => {
    for (const path of ['/v1/adapters', '/v1/models/stories260K/adapters/evaluate']) {
      for (const init of [{ headers: { 'content-type': 'text/plain' }, body: 'hello' }, {}]) {
        const res = await fetch(`${node.url}${path}`, { method: 'POST', ...init, headers: { authorization: `Bearer ${alice}`, ...init.headers } });
        const json = (await res.json()) as Record<string, unknown>;
        assert.deepEqual([res.status, json.code], [400, 'TANDEM_REQUEST_INVALID'], `${path} ${JSON.stringify(init)}: ${JSON.stringify(json)}`);
        assert.match(String(json.message), /must be JSON \(application\/json\) or a form/);
      }
    }
  });

  it('holds a tenant\'s uploads in flight to its storedAdapters quota while their forms are read', async () => {
    const key = await createTenantKey(node, 'uploader');
    type Answer = { status: number; json: Record<string, unknown> };
    // Two forms sent up to their weights and left open: the node holds them for the tenant.
    const boundary = 'tandemTestBoundary';
    const open = ['held-0', 'held-1'].map((name) => {
      const req = request(`${node.url}/v1/adapters`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': `multipart/form-data; boundary=${boundary}` } });
      const state: { answer?: Answer } = {};
      const answered = new Promise<Answer>((resolve, reject) => {
        req.on('response', (res) => {
          let text = '';
          res.setEncoding('utf8').on('data', (c: string) => { text += c; });
          res.on('end', () => resolve((state.answer = { status: res.statusCode ?? 0, json: JSON.parse(text) as Record<string, unknown> })));
        });
        req.on('error', reject);
      });
      for (const [field, value] of [['name', name], ['baseContentHash', contentHash], ['config', config]]) req.write(`--${boundary}\r\nContent-Disposition: form-data; name="${field}"\r\n\r\n${value}\r\n`);
      req.write(`--${boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n\r\n`);
      req.write(weights);
      answered.catch(() => undefined); // destroyed in the finally below when a check fails
      return { req, state, answered };
    });
    try {
      // The open forms reach their handlers in their own time, racing the probes: the first of the
      // tenant's uploads past two at once is refused, whichever it is (without the holds none is).
      let refused: Answer | undefined;
      // (Up to 40 probes, each stored when let through: this tenant may serve 64.)
      for (let i = 0; refused === undefined && i < 40; i++) {
        const probe = await postForm('/v1/adapters', key, uploadParts(`probe-${i}`));
        refused = probe.status === 201 ? open.find((o) => o.state.answer !== undefined)?.state.answer : probe;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(refused?.status, 429, JSON.stringify(refused?.json));
      assert.equal(refused.json.code, 'TANDEM_QUOTA_EXCEEDED');
      assert.match(String(refused.json.message), /storedAdapters quota of 2: 2 adapters of this tenant are being evaluated or uploaded/);
      // Another tenant is not held back; the open forms, once finished, are kept.
      assert.equal((await postForm('/v1/adapters', small, [['name', 'tiny'], ['baseContentHash', contentHash], ['config', config], ['weights', new Uint8Array(8), 'w']])).json.code, 'TANDEM_ADAPTER_INVALID');
      const unanswered = open.filter((o) => o.state.answer === undefined);
      for (const { req } of unanswered) req.end(`\r\n--${boundary}--\r\n`);
      assert.deepEqual((await Promise.all(unanswered.map((o) => o.answered))).map((a) => a.status), unanswered.map(() => 201));
      assert.equal((await postForm('/v1/adapters', key, uploadParts('after'))).status, 201, 'the holds are released with the replies');
    } finally {
      for (const { req } of open) req.destroy();
    }
  });

  it('a weights file naming more tensors than any adapter holds is refused before its header is parsed, for upload and evaluation', async () => {
    const tensors = Object.fromEntries(Array.from({ length: MAX_ADAPTER_TENSORS + 1 }, (_, i) => [`base_model.model.t${i}.lora_A.weight`, { dtype: 'F32' as const, shape: [1], data: new Float32Array(1) }]));
    const many = serializeSafetensors(tensors);
    const upload = await postForm('/v1/adapters', alice, [['name', 'many'], ['baseContentHash', contentHash], ['config', config, 'adapter_config.json'], ['weights', many, 'adapter_model.safetensors']]);
    assert.equal(upload.status, 400);
    assert.equal(upload.json.code, 'TANDEM_ADAPTER_INVALID');
    assert.match(String(upload.json.message), new RegExp(`more than ${MAX_ADAPTER_TENSORS} tensors`));
    const evaluation = await postForm(`/v1/models/stories260K/adapters/evaluate`, alice, [['baseContentHash', contentHash], ['seqLen', '16'], ['config', config, 'adapter_config.json'], ['weights', many, 'adapter_model.safetensors'], ['data', TEXT, 'eval.txt']]);
    assert.equal(evaluation.status, 400, JSON.stringify(evaluation.json));
    assert.match(String(evaluation.json.message), new RegExp(`more than ${MAX_ADAPTER_TENSORS} tensors`));
  });

  it('a form that stalls is dropped after the idle timeout, and its tenant may upload again at once', async () => {
    // One upload in flight at a time for this tenant, and a short idle timeout.
    const stalling = await startTestNode({ tenantQuotas: { staller: { storedAdapters: 1 } }, formIdleTimeoutMs: 400, serving: { maxUploadBytes: 8 * 1024 * 1024 } });
    const key = await createTenantKey(stalling, 'staller');
    const boundary = 'tandemStallBoundary';
    const req = request(`${stalling.url}/v1/adapters`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': `multipart/form-data; boundary=${boundary}` } });
    const closed = new Promise<string>((resolve) => {
      req.on('response', (res) => { res.resume(); res.on('close', () => resolve(`answered ${res.statusCode}`)); });
      req.on('error', (error) => resolve((error as NodeJS.ErrnoException).code ?? error.message));
    });
    // Its fields and the start of its weights, then nothing: the route holds the tenant's one place.
    req.write(`--${boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nstalled\r\n--${boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n\r\n`);
    req.write(weights.subarray(0, 64));
    try {
      // Once its handler holds the tenant's one place, the tenant's next upload is refused (a
      // probe that arrives first is let through and stored).
      let busy: { status: number; json: Record<string, unknown> } | undefined;
      for (let i = 0; i < 20 && busy?.status !== 429; i++) busy = await postFormTo(stalling, '/v1/adapters', key, uploadParts(`waiting-${i}`));
      assert.equal(busy?.json.code, 'TANDEM_QUOTA_EXCEEDED');
      const ended = await Promise.race([closed, new Promise<string>((r) => setTimeout(() => r('still open after 10 s'), 10_000))]);
      assert.match(ended, /ECONNRESET|socket hang up|answered 408/, 'the node closed the stalled form');
      const after = await postFormTo(stalling, '/v1/adapters', key, uploadParts('after-stall'));
      assert.equal(after.status, 201, JSON.stringify(after.json));
    } finally {
      req.destroy();
      await stalling.close();
    }
  });

  it('bounds each part: weights over the tenant\'s quota, data over the text limit, a field over its limit, and JSON over 4 MiB', async () => {
    const quota = await postForm('/v1/adapters', small, uploadParts('big'));
    assert.equal(quota.status, 400, JSON.stringify(quota.json));
    assert.equal(quota.json.code, 'TANDEM_ADAPTER_TOO_LARGE');
    assert.match(String(quota.json.message), /weights bytes = over 1024, over the limit of 1024/);
    const text = await postForm('/v1/models/stories260K/adapters/evaluate', alice, [...evaluateParts().filter(([n]) => n !== 'data'), ['data', 'x'.repeat(8 * 1024 * 1024 + 1), 'eval.txt']]);
    assert.equal(text.json.code, 'TANDEM_EVAL_DATA_INVALID', JSON.stringify(text.json));
    const field = await postForm('/v1/adapters', alice, [['name', 'n'.repeat(70 * 1024)], ...uploadParts('x6').slice(1)]);
    assert.equal(field.json.code, 'TANDEM_FIELD_TOO_LONG', JSON.stringify(field.json));
    const weightsOver = await postForm('/v1/adapters', alice, [...uploadParts('x7').filter(([n]) => n !== 'weights'), ['weights', new Uint8Array(8 * 1024 * 1024 + 1), 'w.safetensors']]);
    assert.equal(weightsOver.status, 413, JSON.stringify(weightsOver.json));
    assert.equal(weightsOver.json.code, 'TANDEM_REQUEST_INVALID');
    const json = await api(node, 'POST', '/v1/adapters', alice, { name: 'x8', baseContentHash: contentHash, adapter: { config, weights: Buffer.alloc(3 * 1024 * 1024).toString('base64') } });
    assert.equal(json.status, 413);
    assert.equal(json.json.code, 'TANDEM_REQUEST_INVALID');
    // The node goes on.
    assert.equal((await postForm('/v1/models/stories260K/adapters/evaluate', alice, evaluateParts())).status, 200);
  });
});
