// Who may send a federation body is checked before the body is read: a tenant that is not an
// owner sampled in the open round (or not the admin, for a new federation) is answered while
// its 60 MB body is still on the way, with the typed error, and the node never parses it; the
// sampled owner's body is held to what the federation's adapter can need.
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { before, describe, it } from 'node:test';
import { readAdapterFolder } from '../../edge-client/index.ts';
import { LlamaModel, createAdapter, initBackend, loadModelFolder, saveAdapter } from '../../model/index.ts';
import { encodeFloat32 } from '../../protocol/index.ts';
import type { FederationCreate, RoundAssignment, RoundUpdate } from '../../protocol/index.ts';
import { STORIES_DIR, api, createTenantKey, startTestNode, tempDir } from './helpers.ts';
import type { TestNode } from './helpers.ts';

let node: TestNode;
let keys: Record<string, string>;

/**
 * Sends the headers and the start of a body that claims `declared` bytes (1 KiB, or `sent`
 * bytes in 64 KiB chunks; chunked when nothing is declared); resolves with the answer that
 * comes before the rest.
 */
function partialPost(path: string, key: string, declared: number | undefined, sent = 0): Promise<{ status: number; json: Record<string, unknown> }> {
  const url = new URL(path, node.url);
  const length: Record<string, string> = declared === undefined ? {} : { 'content-length': String(declared) };
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...length } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown> });
      });
    });
    req.on('error', reject);
    // Without an answer before the body, the test fails here rather than waiting for a body that never comes.
    req.setTimeout(20_000, () => {
      req.destroy();
      reject(new Error(`no answer to ${path} before its body`));
    });
    // The body's start; the rest never comes: only an answer given before parsing can arrive.
    req.write(`{"attempt":0,"examples":1,"loss":1,"delta":[${'0,'.repeat(500)}`);
    for (let at = 0; at < sent; at += 65_536) req.write('0,'.repeat(32_768));
  });
}

before(async () => {
  await initBackend({ backend: 'wasm' });
  node = await startTestNode();
  keys = { alice: await createTenantKey(node, 'alice'), bob: await createTenantKey(node, 'bob'), mallory: await createTenantKey(node, 'mallory') };
  const loaded = await loadModelFolder(STORIES_DIR);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj'] }], { seed: 1 });
  const dir = await tempDir();
  await saveAdapter(adapter, dir);
  adapter.dispose();
  model.dispose();
  const body: FederationCreate = {
    id: 'f', model: 'stories260K', mode: 'offsite', adapter: await readAdapterFolder(dir), rounds: 2, owners: ['alice', 'bob'], sampleSize: 1, minOwners: 1,
    localSteps: 1, roundDeadlineSeconds: 600, aggregation: 'fedavg', secureAggregation: false,
  };
  const created = await api(node, 'POST', '/v1/federations', node.adminKey, body);
  assert.equal(created.status, 201, JSON.stringify(created.json));
});

describe('federation bodies are admitted before they are read', () => {
  it('answers a tenant that is not invited, an unknown federation, a round not open and a tenant creating a federation while their bodies are unsent', async () => {
    const big = 60_000_000;
    const notInvited = await partialPost('/v1/federations/f/rounds/1/updates', keys.mallory, big);
    assert.deepEqual([notInvited.status, notInvited.json.code], [403, 'TANDEM_FED_NOT_INVITED']);
    const unknown = await partialPost('/v1/federations/nope/rounds/1/updates', keys.mallory, big);
    assert.deepEqual([unknown.status, unknown.json.code], [404, 'TANDEM_FED_UNKNOWN']);
    const shares = await partialPost('/v1/federations/nope/rounds/1/secagg/shares', keys.mallory, big);
    assert.equal(shares.json.code, 'TANDEM_FED_UNKNOWN');
    const create = await partialPost('/v1/federations', keys.mallory, big);
    assert.deepEqual([create.status, create.json.code], [403, 'TANDEM_AUTH_ADMIN_REQUIRED']);
    const late = await partialPost('/v1/federations/f/rounds/2/updates', keys.alice, big);
    assert.deepEqual([late.status, late.json.code], [409, 'TANDEM_FED_UPDATE_LATE']);
    // Of the two owners one is sampled: the other is refused before its body too.
    const round = await api(node, 'GET', '/v1/federations/f/round', keys.alice);
    const notSampled = round.json.sampled === true ? 'bob' : 'alice';
    const refused = await partialPost('/v1/federations/f/rounds/1/updates', keys[notSampled], big);
    assert.deepEqual([refused.status, refused.json.code], [403, 'TANDEM_FED_NOT_SAMPLED']);
  });

  it('reads the body of the owner sampled in the open round, whose own checks then apply', async () => {
    const round = await api(node, 'GET', '/v1/federations/f/round', keys.alice);
    const sampled = round.json.sampled === true ? 'alice' : 'bob';
    const stale = await api(node, 'POST', '/v1/federations/f/rounds/1/updates', keys[sampled], { attempt: 7, examples: 1, loss: 1 });
    assert.equal(stale.json.code, 'TANDEM_FED_UPDATE_LATE', 'the attempt, in the body, is checked by the handler');
    const badRound = await api(node, 'POST', '/v1/federations/f/rounds/x/updates', keys[sampled], { attempt: 0, examples: 1, loss: 1 });
    assert.deepEqual([badRound.status, badRound.json.code], [400, 'TANDEM_REQUEST_INVALID']);
  });

  it("takes a sampled owner's heartbeat, says whether its attempt is current, and refuses a tenant not invited and a body that is not { attempt }", async () => {
    const round = await api(node, 'GET', '/v1/federations/f/round', keys.alice);
    const sampled = round.json.sampled === true ? 'alice' : 'bob';
    const beat = await api(node, 'POST', '/v1/federations/f/rounds/1/alive', keys[sampled], { attempt: 0 });
    assert.deepEqual([beat.status, beat.json], [200, { federation: 'f', round: 1, attempt: 0, state: 'open', current: true }]);
    const past = await api(node, 'POST', '/v1/federations/f/rounds/1/alive', keys[sampled], { attempt: 3 });
    assert.equal(past.json.current, false);
    const other = await api(node, 'POST', '/v1/federations/f/rounds/1/alive', keys[sampled === 'alice' ? 'bob' : 'alice'], { attempt: 0 });
    assert.equal(other.json.current, false, 'an owner not sampled in the attempt');
    const mallory = await api(node, 'POST', '/v1/federations/f/rounds/1/alive', keys.mallory, { attempt: 0 });
    assert.deepEqual([mallory.status, mallory.json.code], [403, 'TANDEM_FED_NOT_INVITED']);
    for (const bad of [{}, { attempt: -1 }, { attempt: 'x' }, { attempt: 1.5 }]) {
      const refused = await api(node, 'POST', '/v1/federations/f/rounds/1/alive', keys[sampled], bad);
      assert.deepEqual([refused.status, refused.json.code], [400, 'TANDEM_REQUEST_INVALID'], JSON.stringify(bad));
    }
  });

  it("holds the sampled owner's update to the size of the federation's adapter, declared or not", async () => {
    const round = await api(node, 'GET', '/v1/federations/f/round', keys.alice);
    const sampled = round.json.sampled === true ? 'alice' : 'bob';
    const assignment = (await api(node, 'GET', '/v1/federations/f/round', keys[sampled])).json as unknown as RoundAssignment;
    const size = Object.values(assignment.adapter!.tensors).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
    const limit = 4 * Math.ceil((size * 4) / 3) + 64 * 1024;
    const declared = await partialPost('/v1/federations/f/rounds/1/updates', keys[sampled], 60_000_000);
    assert.deepEqual([declared.status, declared.json.code], [413, 'TANDEM_REQUEST_INVALID']);
    assert.match(String(declared.json.message), new RegExp(`more than ${limit} bytes`));
    // Chunked, no length: refused once its bytes pass the limit, the rest unsent.
    const streamed = await partialPost('/v1/federations/f/rounds/1/updates', keys[sampled], undefined, limit + 200_000);
    assert.deepEqual([streamed.status, streamed.json.code], [413, 'TANDEM_REQUEST_INVALID']);
    const shares = await partialPost('/v1/federations/f/rounds/1/secagg/shares', keys[sampled], 60_000_000);
    assert.deepEqual([shares.status, shares.json.code], [413, 'TANDEM_REQUEST_INVALID'], 'a share an owner, one owner sampled');
    // A real update of that size, with every field, is taken.
    const update: RoundUpdate = { attempt: assignment.attempt, examples: 3, loss: 1.5, validation: { loss: 1.25, accuracy: 0.5 }, values: encodeFloat32(new Float32Array(size)) };
    const taken = await api(node, 'POST', '/v1/federations/f/rounds/1/updates', keys[sampled], update);
    assert.equal(taken.status, 200, JSON.stringify(taken.json));
  });
});
