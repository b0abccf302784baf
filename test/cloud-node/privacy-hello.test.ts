// Defenses are negotiated at Hello (protocol v1.1): a real node accepts known ones and echoes
// them in Welcome (and again when the session is reopened), refuses an unknown one with a typed
// error naming it, and still welcomes a v1.0 edge that offers none. The edge refuses a v1.1
// Welcome whose echo differs from what it offered.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { checkDefenseEcho } from '../../edge-client/index.ts';
import type { Defense } from '../../protocol/index.ts';
import { TestClient, assertError, createTenantKey, helloBody, startTestNode } from './helpers.ts';

const OFFER: Defense[] = [
  { name: 'noise', scale: 0.5, clip: 2, noiseStd: 0.125 },
  { name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 },
  { name: 'marvell', scale: 0.25, clip: 0, noiseStd: 0 },
];

describe('defenses at Hello', () => {
  it('accepts known defenses and echoes them, refuses an unknown one, and welcomes a v1.0 edge', async () => {
    const node = await startTestNode({ backend: 'wasm' });
    const key = await createTenantKey(node, 'alice');
    const known = await TestClient.connect(node, key);
    const welcome = await known.hello({ versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 2 } }, defenses: OFFER });
    assert.deepEqual(welcome.version, { major: 1, minor: 2 });
    assert.deepEqual(welcome.defenses, OFFER, 'Welcome echoes the accepted defenses');
    checkDefenseEcho(OFFER, welcome);
    const reopened = await known.request({ case: 'sessionOpen', value: { sessionId: welcome.sessionId, resumeStep: 0 } });
    assert.ok(reopened.body.case === 'welcome');
    assert.deepEqual(reopened.body.value.defenses, OFFER, 'a reopened session echoes them too');

    const plain = await TestClient.connect(node, key);
    const plainWelcome = await plain.hello({});
    assert.equal(plainWelcome.defenses, undefined, 'no defenses offered, none echoed');
    checkDefenseEcho([], plainWelcome);

    const unknown = await TestClient.connect(node, key);
    const reply = await unknown.request(helloBody({ defenses: [{ name: 'shuffle', scale: 1, clip: 0, noiseStd: 0 }] }));
    assertError(reply, 'TANDEM_PROTO_DEFENSE_UNKNOWN');
    assert.ok(reply.body.case === 'error' && /shuffle/.test(reply.body.value.message));

    const old = await TestClient.connect(node, key);
    const oldWelcome = await old.hello({ versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } } });
    assert.deepEqual(oldWelcome.version, { major: 1, minor: 0 });
    checkDefenseEcho(OFFER, oldWelcome); // a v1.0 Welcome has no echo to check

    const refused = (w: typeof welcome) => assert.throws(() => checkDefenseEcho(OFFER, w), (e: Error & { code?: string }) => e.code === 'TANDEM_EDGE_RESPONSE_INVALID' && /welcome\.defenses/.test(e.message));
    refused({ ...welcome, defenses: undefined });
    refused({ ...welcome, defenses: OFFER.slice(1) });
    refused({ ...welcome, defenses: [{ ...OFFER[0], noiseStd: 0.01 }, ...OFFER.slice(1)] });
  });
});
