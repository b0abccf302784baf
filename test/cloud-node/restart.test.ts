import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { decodeTensor } from '../../protocol/index.ts';
import { HIDDEN, TestClient, api, assertError, createTenantKey, frameOf, randomTensor, startTestNode, tempDir } from './helpers.ts';

describe('a node restarted on the same state directory', () => {
  it('keeps the keys and the sessions; a session reattaches by SessionOpen and its backward recomputes from a resent h_B', async () => {
    const stateDir = await tempDir();
    const first = await startTestNode({ stateDir });
    assert.ok(first.adminKey.startsWith('tdk_'), 'the first start creates the admin key');
    const key = await createTenantKey(first, 'alice');
    const client = await TestClient.connect(first, key);
    const welcome = await client.hello({ cut: { bottom: 1, top: 1 }, codecs: { forward: [{ codec: 'f16' }], backward: [{ codec: 'f32' }] } });
    await client.step(0);
    const shape: [number, number, number] = [1, 6, HIDDEN];
    const h = randomTensor(shape, 41);
    const g = randomTensor(shape, 42);
    assert.equal((await client.request(client.forwardBody(1, 0, [frameOf(h, shape)]))).body.case, 'forwardResult');
    const before = await client.request(client.backwardBody(1, 0, [frameOf(g, shape)]));
    assert.equal(before.body.case, 'backwardResult');
    assert.equal((await client.request(client.forwardBody(2, 0, [frameOf(h, shape)]))).body.case, 'forwardResult');
    client.close();
    await first.close();

    const second = await startTestNode({ stateDir });
    assert.equal(second.adminKey, '', 'the admin key is printed once, on the first start only');
    const listed = await api(second, 'GET', '/v1/sessions', key);
    assert.equal(listed.status, 200, 'the tenant key survived the restart');
    const [session] = listed.json.sessions as { id: string; lastStep: number; cut: unknown }[];
    assert.equal(session.id, welcome.sessionId);
    assert.equal(session.lastStep, 2);
    assert.deepEqual(session.cut, { bottom: 1, top: 1 });

    const back = await TestClient.connect(second, key);
    const reopened = await back.request({ case: 'sessionOpen', value: { sessionId: welcome.sessionId, resumeStep: 1 } });
    assert.equal(reopened.body.case, 'welcome');
    if (reopened.body.case !== 'welcome') return;
    assert.equal(reopened.body.value.sessionId, welcome.sessionId);
    assert.deepEqual(reopened.body.value.codecs, welcome.codecs);
    assert.deepEqual(reopened.body.value.cut, welcome.cut);
    back.sessionId = welcome.sessionId;
    // Resumed at step 1: the activations died with the old process, h_B is asked for and resent.
    assertError(await back.request(back.backwardBody(1, 0, [frameOf(g, shape)])), 'TANDEM_ACTIVATIONS_GONE');
    const after = await back.request(back.backwardBody(1, 0, [frameOf(g, shape), frameOf(h, shape)]));
    assert.equal(after.body.case, 'backwardResult');
    if (after.body.case !== 'backwardResult' || before.body.case !== 'backwardResult') return;
    assert.equal(after.body.value.recomputed, true);
    assert.deepEqual(decodeTensor(after.body.value.frames[0]), decodeTensor(before.body.value.frames[0]));
    await back.step(2);
    assert.equal((await api(second, 'GET', `/v1/sessions/${welcome.sessionId}`, key)).json.lastStep, 2);
    await second.close();
  });

  it('refuses to start on a corrupt state file with TANDEM_STATE_INVALID', async () => {
    const stateDir = await tempDir();
    const { writeFile } = await import('node:fs/promises');
    await writeFile(`${stateDir}/sessions.json`, '{ not json');
    await assert.rejects(startTestNode({ stateDir }), (err: Error & { code?: string }) => err.code === 'TANDEM_STATE_INVALID');
  });
});
