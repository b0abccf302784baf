// The data-plane items of finding 9 of issue 9: chunk reassembly reserved the declared total
// up front, with no node-wide cap and no stream timeout; the cloud could send a non-finite g_B
// although the session forbids non-finite values; codec parameters in the Hello were checked
// only after the compute.
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { decodeEnvelope, splitMessage } from '../../protocol/index.ts';
import type { Envelope, Hello } from '../../protocol/index.ts';
import { HIDDEN, TestClient, assertError, createTenantKey, frameOf, helloBody, randomTensor, startTestNode } from './helpers.ts';
import type { TestNode } from './helpers.ts';
import { bystander, survives } from './hardening.ts';
import type { Bystander } from './hardening.ts';

const TIMEOUT_MS = 300;
const BUDGET = 40 * 1024;
let node: TestNode;
let good: Bystander;
let key = '';

before(async () => {
  node = await startTestNode({ chunkStreamTimeoutMs: TIMEOUT_MS, reassemblyBudgetBytes: BUDGET });
  good = await bystander(node);
  key = await createTenantKey(node, 'mallory');
});

const details = (reply: Envelope): Record<string, string> => (reply.body.case === 'error' ? reply.body.value.details : {});

describe('finding 9, data plane: reassembly, non-finite results, codec parameters', () => {
  it('streams that stop after their first chunk hold only that chunk, under a node-wide cap, and time out', async () => {
    // Each stream declares 150 KiB (within one request's limit) and sends 16 KiB of it.
    const declared = new Uint8Array(150 * 1024);
    const sockets = await Promise.all([0, 1, 2, 3].map(async () => TestClient.connect(node, key)));
    const firstChunks = sockets.map((_, i) => splitMessage(declared, `stall-${i}`, 16 * 1024));
    const acks = await survives(node, good, async () => {
      const out: unknown[] = [];
      for (const [i, socket] of sockets.entries()) out.push(await socket.sendRaw(firstChunks[i][0]));
      return out;
    });
    assert.deepEqual(acks.slice(0, 2), [null, null], 'two stalled streams fit the 40 KiB cap');
    const refused = decodeEnvelope(acks[2] as Uint8Array);
    assertError(refused, 'TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED');
    assert.equal(details(refused).field, 'bytes being reassembled on this node');
    assert.equal(details(refused).limit, String(BUDGET));
    await new Promise((resolve) => setTimeout(resolve, 3 * TIMEOUT_MS));
    const late = decodeEnvelope((await sockets[0].sendRaw(firstChunks[0][1])) as Uint8Array);
    assertError(late, 'TANDEM_PROTO_CHUNK_TIMEOUT');
    // The cap is free again: a good tenant's chunked step (32 KiB frames, 3 chunks each way) goes through.
    const big: [number, number, number] = [2, 64, HIDDEN];
    const other = (await bystander(node)).client;
    const fwd = await other.request(other.forwardBody(0, 0, [frameOf(randomTensor(big, 4), big)], false));
    assert.equal(fwd.body.case, 'forwardResult', JSON.stringify(fwd.body.value));
  });

  it('a g_M that overflows the middle\'s backward gets TANDEM_RESULT_NON_FINITE, not a non-finite g_B', async () => {
    const attacker = await TestClient.connect(node, key);
    const welcome = await attacker.hello();
    assert.equal(welcome.allowNonFinite, false);
    const shape: [number, number, number] = [1, 8, HIDDEN];
    assert.equal((await attacker.request(attacker.forwardBody(0, 0, [frameOf(randomTensor(shape, 1), shape)]))).body.case, 'forwardResult');
    const huge = randomTensor(shape, 2).map((v) => Math.sign(v) * 3e38); // finite, as the session requires
    const reply = await survives(node, good, () => attacker.request(attacker.backwardBody(0, 0, [frameOf(huge, shape)])));
    assertError(reply, 'TANDEM_RESULT_NON_FINITE');
    assert.equal(details(reply).field, 'g_B');
  });

  it('codec parameters out of range in the Hello are refused at the Hello with TANDEM_CODEC_PARAMS_INVALID', async () => {
    const attacker = await TestClient.connect(node, key);
    const hello = helloBody().value as Hello;
    for (const codecs of [
      { forward: [{ codec: 'topk' as const, topkFraction: 5, topkValues: 'f16' as const }], backward: [{ codec: 'f32' as const }] },
      { forward: [{ codec: 'f32' as const }], backward: [{ codec: 'int8-block' as const, blockSize: 1 << 20 }] },
    ]) {
      const reply = await survives(node, good, () => attacker.request({ case: 'hello', value: { ...hello, codecs } }));
      assertError(reply, 'TANDEM_CODEC_PARAMS_INVALID');
      assert.equal(details(reply).direction, codecs.forward[0].codec === 'topk' ? 'forward' : 'backward');
    }
  });
});
