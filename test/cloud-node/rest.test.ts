import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { loadModelFolder, parseSafetensors } from '../../model/index.ts';
import { STORIES_DIR, TestClient, api, createTenantKey, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';

let node: TestNode;
let aliceKey: string;
let bobKey: string;

before(async () => {
  node = await startTestNode();
  aliceKey = await createTenantKey(node, 'alice');
  bobKey = await createTenantKey(node, 'bob');
});

describe('REST: health, models and the edge download', () => {
  it('answers health and readiness without a key', async () => {
    assert.deepEqual((await api(node, 'GET', '/v1/health')).json, { status: 'ok' });
    const ready = await api(node, 'GET', '/v1/ready');
    assert.equal(ready.status, 200);
    assert.deepEqual(ready.json, { status: 'ready' });
  });

  it('lists the served model with its hash, config and allowed cuts', async () => {
    const { status, json } = await api(node, 'GET', '/v1/models', aliceKey);
    assert.equal(status, 200);
    const [model] = json.models as Record<string, unknown>[];
    assert.equal(model.id, 'stories260K');
    assert.equal(model.modelType, 'llama');
    assert.equal(model.numLayers, 5);
    assert.match(model.contentHash as string, /^sha256:[0-9a-f]{64}$/);
    assert.deepEqual(model.cuts, { minBottom: 0, minTop: 1, maxBottomPlusTop: 4 });
    assert.deepEqual(model.defaultCut, { bottom: 2, top: 2 });
    assert.deepEqual(model.config, JSON.parse(await readFile(join(STORIES_DIR, 'config.json'), 'utf8')));
  });

  it('serves the edge part of a cut, every file matching the sha256 of its manifest', async () => {
    const manifest = await api(node, 'GET', '/v1/models/stories260K/edge?bottom=1&top=2', aliceKey);
    assert.equal(manifest.status, 200);
    const files = manifest.json.files as { name: string; bytes: number; sha256: string }[];
    assert.deepEqual(files.map((f) => f.name).sort(), ['config.json', 'edge.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    assert.deepEqual(manifest.json.cut, { bottom: 1, top: 2 });
    for (const file of files) {
      const got = await api(node, 'GET', `/v1/models/stories260K/edge/files/${file.name}?bottom=1&top=2`, aliceKey);
      assert.equal(got.status, 200);
      assert.equal(got.bytes.length, file.bytes);
      assert.equal(got.headers.get('content-length'), String(file.bytes), 'a streamed file still says its length');
      assert.equal(createHash('sha256').update(got.bytes).digest('hex'), file.sha256);
      assert.equal(got.headers.get('x-tandem-sha256'), file.sha256);
    }
    const weights = await api(node, 'GET', '/v1/models/stories260K/edge/files/edge.safetensors?bottom=1&top=2', aliceKey);
    const contents = parseSafetensors(weights.bytes, 'edge.safetensors');
    const layers = new Set([...contents.tensors.keys()].map((n) => /^model\.layers\.(\d+)\./.exec(n)?.[1]).filter((x) => x !== undefined));
    assert.deepEqual([...layers].sort(), ['0', '3', '4'], 'blocks [0, 1) and [3, 5); the middle stays in the cloud');
    assert.ok(contents.tensors.has('model.embed_tokens.weight'));
    assert.ok(contents.tensors.has('model.norm.weight'));
    assert.ok(!contents.tensors.has('lm_head.weight'), 'tied embeddings: no separate head');
    assert.equal(contents.metadata.contentHash, manifest.json.contentHash);
    assert.equal(contents.metadata.bottom, '1');
    assert.equal(contents.metadata.top, '2');
    // The values are the model folder's, bit for bit (the node reads them back from its tensors).
    const folder = await loadModelFolder(STORIES_DIR);
    for (const [name, t] of contents.tensors) {
      const want = folder.weights.get(name);
      assert.ok(want !== undefined, name);
      assert.deepEqual(t.shape, want.shape, name);
      assert.deepEqual(new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength)), want.data, name);
    }
  });

  it('refuses a cut without a middle block, an unknown model and an unknown file with typed errors', async () => {
    const bad = await api(node, 'GET', '/v1/models/stories260K/edge?bottom=3&top=2', aliceKey);
    assert.equal(bad.status, 400);
    assert.equal(bad.json.code, 'TANDEM_CUT_INVALID');
    assert.equal((await api(node, 'GET', '/v1/models/other/edge', aliceKey)).json.code, 'TANDEM_MODEL_UNKNOWN');
    const file = await api(node, 'GET', '/v1/models/stories260K/edge/files/model.safetensors', aliceKey);
    assert.equal(file.status, 404);
    assert.equal(file.json.code, 'TANDEM_EDGE_FILE_UNKNOWN');
    const query = await api(node, 'GET', '/v1/models/stories260K/edge?bottom=two', aliceKey);
    assert.equal(query.status, 400);
    assert.equal(query.json.code, 'TANDEM_REQUEST_INVALID');
  });
});

describe('REST: keys and tenants', () => {
  it('refuses a missing, malformed or wrong key on every authenticated route', async () => {
    for (const path of ['/v1/models', '/v1/sessions', '/v1/openapi.json', '/v1/models/stories260K/edge']) {
      const none = await api(node, 'GET', path);
      assert.equal(none.status, 401, path);
      assert.equal(none.json.code, 'TANDEM_AUTH_KEY_MISSING', path);
      const wrong = await api(node, 'GET', path, 'tdk_wrong');
      assert.equal(wrong.status, 401, path);
      assert.equal(wrong.json.code, 'TANDEM_AUTH_KEY_INVALID', path);
    }
  });

  it('lets only the admin create keys, for valid tenant names', async () => {
    const denied = await api(node, 'POST', '/v1/keys', aliceKey, { tenant: 'mallory' });
    assert.equal(denied.status, 403);
    assert.equal(denied.json.code, 'TANDEM_AUTH_ADMIN_REQUIRED');
    const badName = await api(node, 'POST', '/v1/keys', node.adminKey, { tenant: '../etc' });
    assert.equal(badName.status, 400);
    assert.equal(badName.json.code, 'TANDEM_TENANT_INVALID');
    const keys = JSON.parse(await readFile(join(node.stateDir, 'keys.json'), 'utf8')) as { keys: { tenant: string; sha256: string }[] };
    assert.ok(!JSON.stringify(keys).includes(aliceKey), 'keys are stored hashed');
    assert.ok(keys.keys.some((k) => k.tenant === 'alice' && k.sha256 === createHash('sha256').update(aliceKey).digest('hex')));
  });

  it("shows a tenant its own sessions only; another tenant's is 404 TANDEM_SESSION_UNKNOWN; the admin sees all", async () => {
    const alice = await TestClient.connect(node, aliceKey);
    await alice.hello();
    const bob = await TestClient.connect(node, bobKey);
    await bob.hello();
    await alice.step(0);
    const mine = await api(node, 'GET', '/v1/sessions', aliceKey);
    const ids = (mine.json.sessions as { id: string; tenant: string }[]).map((s) => s.id);
    assert.ok(ids.includes(alice.sessionId));
    assert.ok(!ids.includes(bob.sessionId));
    const one = await api(node, 'GET', `/v1/sessions/${alice.sessionId}`, aliceKey);
    assert.equal(one.json.tenant, 'alice');
    assert.equal(one.json.lastStep, 0);
    assert.equal(one.json.state, 'open');
    for (const method of ['GET', 'DELETE']) {
      const theirs = await api(node, method, `/v1/sessions/${bob.sessionId}`, aliceKey);
      assert.equal(theirs.status, 404, method);
      assert.equal(theirs.json.code, 'TANDEM_SESSION_UNKNOWN', method);
    }
    const all = (await api(node, 'GET', '/v1/sessions', node.adminKey)).json.sessions as { id: string }[];
    assert.ok(all.some((s) => s.id === bob.sessionId) && all.some((s) => s.id === alice.sessionId));
    // Bob's session was untouched by alice's DELETE; closing it over REST ends it on the socket too.
    await bob.step(0);
    const closed = await api(node, 'DELETE', `/v1/sessions/${bob.sessionId}`, bobKey);
    assert.equal(closed.status, 200);
    assert.equal(closed.json.state, 'closed');
    const after = await bob.request(bob.forwardBody(1, 0, []));
    assert.equal(after.body.case === 'error' && after.body.value.code, 'TANDEM_SESSION_CLOSED');
    await alice.step(1);
  });
});

describe('REST: the operator surface', () => {
  it('publishes an OpenAPI document with a schema for every route', async () => {
    const { status, json } = await api(node, 'GET', '/v1/openapi.json', aliceKey);
    assert.equal(status, 200);
    assert.match(json.openapi as string, /^3\./);
    const paths = json.paths as Record<string, Record<string, { responses?: Record<string, unknown> }>>;
    for (const path of ['/v1/health', '/v1/ready', '/v1/models', '/v1/models/{id}/edge', '/v1/models/{id}/edge/files/{name}', '/v1/sessions', '/v1/sessions/{id}', '/v1/keys', '/metrics', '/v1/openapi.json']) {
      assert.ok(paths[path], `${path} is documented`);
      for (const [method, operation] of Object.entries(paths[path])) assert.ok(operation.responses && Object.keys(operation.responses).length > 0, `${method} ${path} has response schemas`);
    }
  });

  it('exposes Prometheus metrics without a key', async () => {
    const response = await fetch(`${node.url}/metrics`);
    assert.equal(response.status, 200);
    const text = await response.text();
    for (const name of ['tandem_sessions_open', 'tandem_steps_total', 'tandem_frame_bytes_total', 'tandem_step_seconds_bucket', 'tandem_activation_cache_bytes', 'tandem_activation_evictions_total', 'tandem_recomputes_total']) {
      assert.ok(text.includes(name), name);
    }
    assert.ok(!text.includes('alice'), 'no tenant names in metrics');
  });

  it('answers an unknown route with TANDEM_ROUTE_UNKNOWN', async () => {
    const { status, json } = await api(node, 'GET', '/v1/nothing', aliceKey);
    assert.equal(status, 404);
    assert.equal(json.code, 'TANDEM_ROUTE_UNKNOWN');
  });
});
