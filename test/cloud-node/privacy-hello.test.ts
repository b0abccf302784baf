// Defenses are negotiated at Hello (protocol v1.1): a real node accepts known ones, refuses an
// unknown one with a typed error naming it, and still welcomes a v1.0 edge that offers none.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { TestClient, assertError, createTenantKey, helloBody, startTestNode } from './helpers.ts';

describe('defenses at Hello', () => {
  it('accepts known defenses, refuses an unknown one, and welcomes a v1.0 edge', async () => {
    const node = await startTestNode({ backend: 'wasm' });
    const key = await createTenantKey(node, 'alice');
    const known = await TestClient.connect(node, key);
    const welcome = await known.hello({
      versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 1 } },
      defenses: [{ name: 'noise', scale: 0.5, clip: 2, noiseStd: 0.125 }, { name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 }],
    });
    assert.deepEqual(welcome.version, { major: 1, minor: 1 });

    const unknown = await TestClient.connect(node, key);
    const reply = await unknown.request(helloBody({ defenses: [{ name: 'shuffle', scale: 1, clip: 0, noiseStd: 0 }] }));
    assertError(reply, 'TANDEM_PROTO_DEFENSE_UNKNOWN');
    assert.ok(reply.body.case === 'error' && /shuffle/.test(reply.body.value.message));

    const old = await TestClient.connect(node, key);
    const oldWelcome = await old.hello({ versions: { min: { major: 1, minor: 0 }, max: { major: 1, minor: 0 } } });
    assert.deepEqual(oldWelcome.version, { major: 1, minor: 0 });
  });
});
