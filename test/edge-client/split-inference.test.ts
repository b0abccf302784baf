// Split inference against a real node: the edge runs bottom and top with its private adapter,
// the cloud the middle with its KV cache; the greedy tokens equal local generation.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import type { CommandIo } from '../../cli/io.ts';
import { connectCloud, splitGenerate } from '../../edge-client/index.ts';
import type { CloudClient, EdgeSession } from '../../edge-client/index.ts';
import { createAdapter, generate, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, onEdge, saveAdapter } from '../../model/index.ts';
import type { LoadedModel } from '../../model/index.ts';
import { encodeTensor } from '../../protocol/index.ts';
import { api, createTenantKey, metric, startTestNode, STORIES_DIR, tempDir } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';

const CUT = { bottom: 2, top: 2 };
let node: TestNode;
let client: CloudClient;
let session: EdgeSession;
let loaded: LoadedModel;
let full: LlamaModel;
let edge: LlamaModel;
let adapterDir: string;
let key: string;

async function cli(argv: string[]): Promise<{ code: number; json: { input_ids: number[]; generated_ids: number[]; text: string } }> {
  const out: string[] = [];
  const io: CommandIo = { out: (l) => out.push(l), log: () => {} };
  const code = await main(argv, io);
  return { code, json: JSON.parse(out.join('\n') || '{}') as { input_ids: number[]; generated_ids: number[]; text: string } };
}

before(async () => {
  // The cpu backend, not the suite's wasm: a long InferStep below must compute for a good part of a second.
  await initBackend({ backend: 'cpu' });
  node = await startTestNode({ backend: 'cpu' });
  key = await createTenantKey(node, 'owner');
  loaded = await loadModelFolder(STORIES_DIR);
  full = LlamaModel.fromArrays(loaded.config, loaded.weights);
  edge = LlamaModel.fromArrays(loaded.config, loaded.weights, (name) => onEdge(name, CUT, loaded.config.numHiddenLayers));
  // A private adapter on the edge's blocks only: the cloud never sees it.
  const adapter = createAdapter(full, [{ method: 'lora', r: 4, loraAlpha: 64, initLoraWeights: false, targetModules: ['q_proj', 'v_proj', 'down_proj'], layersToTransform: [0, 1, 3, 4] }], { seed: 21 });
  adapterDir = await tempDir();
  await saveAdapter(adapter, adapterDir);
  adapter.dispose();
  client = await connectCloud(node.url, { key });
  const contentHash = ((await api(node, 'GET', '/v1/models', key)).json.models as { contentHash: string }[])[0].contentHash;
  session = await client.openSession({ model: { id: 'stories260K', contentHash }, cut: CUT, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
});

after(() => {
  client?.close();
  full?.dispose();
  edge?.dispose();
});

describe('split inference', () => {
  it('gives the greedy tokens of local generation with the same adapter, and frees the middle cache after', async () => {
    const tokenizer = await loadTokenizer(STORIES_DIR);
    for (const prompt of ['Once upon a time', 'Lily and her mom went to the park']) {
      const ids = tokenizer.encode(prompt);
      const local = await loadAdapter(full, adapterDir);
      const want = generate(full, ids, { maxNewTokens: 16, temperature: 0, hooks: local.hooks }).generatedIds;
      const plain = generate(full, ids, { maxNewTokens: 16, temperature: 0 }).generatedIds;
      local.dispose();
      const onEdgeAdapter = await loadAdapter(edge, adapterDir);
      const got = await splitGenerate(session, edge, ids, { maxNewTokens: 16, temperature: 0 }, onEdgeAdapter);
      onEdgeAdapter.dispose();
      assert.deepEqual(got.generatedIds, want, prompt);
      assert.notDeepEqual(want, plain, 'the adapter changes the tokens');
    }
    const metrics = Buffer.from((await api(node, 'GET', '/metrics')).bytes).toString('utf8');
    assert.match(metrics, /^tandem_split_inference_kv_cache_bytes 0$/m);
  });

  it('`tandem edge generate --adapter` prints what `tandem generate --adapter` prints', async () => {
    const common = ['--adapter', adapterDir, '--prompt', 'Once upon a time', '--max-new-tokens', '12', '--temperature', '0', '--json', '--backend', 'cpu'];
    const local = await cli(['generate', '--model', STORIES_DIR, ...common]);
    const split = await cli(['edge', 'generate', '--cloud', node.url, '--key', key, '--cache', await tempDir(), ...common]);
    assert.equal(local.code, 0);
    assert.equal(split.code, 0);
    const { input_ids, generated_ids, text } = local.json;
    assert.deepEqual(split.json, { input_ids, generated_ids, text });
  });

  it('refuses a position that does not continue the sequence (4030); position 0 starts again, InferEnd frees', async () => {
    const frame = encodeTensor(new Float32Array(64), [1, 1, 64], { codec: 'f32' }, { name: 'h_B' });
    await assert.rejects(session.request({ case: 'inferStep', value: { sessionId: session.id, position: 5, frames: [frame] } }), (err: { remoteCode?: string }) => err.remoteCode === 'TANDEM_PROTO_INFER_POSITION_INVALID');
    const reply = await session.request({ case: 'inferStep', value: { sessionId: session.id, position: 0, frames: [frame] } });
    assert.equal(reply.body.case, 'inferStepResult');
    const end = await session.request({ case: 'inferEnd', value: { sessionId: session.id } });
    assert.equal(end.body.case, 'inferEnd');
  });

  it('a resent InferStep (its reply lost) gets the same h_M, and the cache is not grown twice', async () => {
    const hidden = loaded.config.hiddenSize;
    const frameOf = (tokens: number, seed: number) => {
      const data = new Float32Array(tokens * hidden).map((_, i) => Math.sin(seed * 7.1 + i * 0.37));
      return encodeTensor(data, [1, tokens, hidden], { codec: 'f32' }, { name: 'h_B' });
    };
    const steps = [{ position: 0, frame: frameOf(3, 1) }, { position: 3, frame: frameOf(1, 2) }, { position: 4, frame: frameOf(1, 3) }];
    const run = async (resend: boolean): Promise<Uint8Array[]> => {
      const out: Uint8Array[] = [];
      for (const { position, frame } of steps) {
        const send = async () => {
          const reply = await session.request({ case: 'inferStep', value: { sessionId: session.id, position, frames: [frame] } });
          assert.equal(reply.body.case, 'inferStepResult');
          return reply.body.case === 'inferStepResult' ? reply.body.value.frames[0].payload : new Uint8Array();
        };
        const first = await send();
        if (resend) assert.deepEqual(await send(), first, `position ${position}: the resend's h_M is the first's`);
        out.push(first);
      }
      await session.request({ case: 'inferEnd', value: { sessionId: session.id } });
      return out;
    };
    const plain = await run(false);
    const replayed = await metric(node, 'tandem_split_inference_steps_total{outcome="replayed"}');
    const computed = await metric(node, 'tandem_split_inference_steps_total{outcome="computed"}');
    const resent = await run(true);
    assert.deepEqual(resent, plain, 'every step, the last one too, equals a run without resends: no step ran twice');
    assert.equal(await metric(node, 'tandem_split_inference_steps_total{outcome="replayed"}'), replayed + steps.length, 'each resend was answered from what was kept');
    assert.equal(await metric(node, 'tandem_split_inference_steps_total{outcome="computed"}'), computed + steps.length);
    // The same position with other values is not a resend.
    await session.request({ case: 'inferStep', value: { sessionId: session.id, position: 0, frames: [steps[0].frame] } });
    await session.request({ case: 'inferStep', value: { sessionId: session.id, position: 3, frames: [steps[1].frame] } });
    await assert.rejects(session.request({ case: 'inferStep', value: { sessionId: session.id, position: 3, frames: [frameOf(1, 9)] } }), (err: { remoteCode?: string }) => err.remoteCode === 'TANDEM_PROTO_INFER_POSITION_INVALID');
    await session.request({ case: 'inferEnd', value: { sessionId: session.id } });
  });

  it('a long InferStep computes off the event loop: /v1/ready and a heartbeat are answered while it runs', async () => {
    const contentHash = ((await api(node, 'GET', '/v1/models', key)).json.models as { contentHash: string }[])[0].contentHash;
    // Three middle blocks on 255 tokens (64 KiB of h_B, the test limit per frame): about half a second on the cpu backend.
    const wide = await client.openSession({ model: { id: 'stories260K', contentHash }, cut: { bottom: 1, top: 1 }, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
    const tokens = 255;
    const frame = encodeTensor(new Float32Array(tokens * loaded.config.hiddenSize).map((_, i) => Math.sin(i * 0.01)), [1, tokens, loaded.config.hiddenSize], { codec: 'f32' }, { name: 'h_B' });
    const order: string[] = [];
    const step = wide.request({ case: 'inferStep', value: { sessionId: wide.id, position: 0, frames: [frame] } }).then((r) => {
      order.push('inferStep');
      return r;
    });
    await new Promise((r) => setTimeout(r, 30)); // the step is on its way (and decoded) before the small requests leave
    const ready = api(node, 'GET', '/v1/ready').then((r) => {
      order.push('ready');
      return r;
    });
    const beat = session.request({ case: 'heartbeat', value: { sessionId: session.id, sequence: 1, sentAtMs: Date.now() } }).then((r) => {
      order.push('heartbeat');
      return r;
    });
    assert.equal((await ready).status, 200);
    assert.equal((await beat).body.case, 'heartbeat');
    assert.equal((await step).body.case, 'inferStepResult');
    assert.equal(order.at(-1), 'inferStep', `the small requests came back first: ${order.join(', ')}`);
    await wide.request({ case: 'inferEnd', value: { sessionId: wide.id } });
  });

  it('a generation whose middle cache is lost midway (the worker dies) rebuilds it and gives the same tokens', async () => {
    const tokenizer = await loadTokenizer(STORIES_DIR);
    const ids = tokenizer.encode('Once upon a time');
    const local = await loadAdapter(full, adapterDir);
    const want = generate(full, ids, { maxNewTokens: 12, temperature: 0, hooks: local.hooks }).generatedIds;
    local.dispose();
    for (const when of ['between steps', 'during a step']) {
      let steps = 0;
      // The session as splitGenerate sees it; the worker is ended before the 5th step is sent, or while it computes.
      const proxy = {
        id: session.id, welcome: session.welcome,
        request: async (body: Parameters<EdgeSession['request']>[0]) => {
          if (body.case === 'inferStep' && ++steps === 5) {
            if (when === 'between steps') await node.compute.terminateSplitInference();
            else {
              const sent = session.request(body);
              await node.compute.terminateSplitInference();
              return sent;
            }
          }
          return session.request(body);
        },
      } as unknown as EdgeSession;
      const onEdgeAdapter = await loadAdapter(edge, adapterDir);
      const got = await splitGenerate(proxy, edge, ids, { maxNewTokens: 12, temperature: 0 }, onEdgeAdapter);
      onEdgeAdapter.dispose();
      assert.ok(steps > 6, `${when}: the generation went on past the lost cache (${steps} steps sent)`);
      assert.deepEqual(got.generatedIds, want, when);
    }
  });

  it('a split-inference worker that dies loses its caches: the sequence starts again at position 0, on a fresh worker, alike', async () => {
    const hidden = loaded.config.hiddenSize;
    const frame = (tokens: number, seed: number) => encodeTensor(new Float32Array(tokens * hidden).map((_, i) => Math.sin(seed + i * 0.05)), [1, tokens, hidden], { codec: 'f32' }, { name: 'h_B' });
    const step = async (position: number, f: ReturnType<typeof frame>): Promise<Uint8Array> => {
      const reply = await session.request({ case: 'inferStep', value: { sessionId: session.id, position, frames: [f] } });
      return reply.body.case === 'inferStepResult' ? reply.body.value.frames[0].payload : new Uint8Array();
    };
    const first = await step(0, frame(3, 1));
    await step(3, frame(1, 2));
    const restarts = await metric(node, 'tandem_split_inference_worker_restarts_total');
    assert.equal(await node.compute.terminateSplitInference(), true);
    assert.equal(await metric(node, 'tandem_split_inference_worker_restarts_total'), restarts + 1);
    await assert.rejects(step(4, frame(1, 3)), (err: { remoteCode?: string; message: string }) => err.remoteCode === 'TANDEM_PROTO_INFER_POSITION_INVALID' && /holds 0 positions/.test(err.message) && err.message.split('TANDEM_PROTO_INFER_POSITION_INVALID').length === 2);
    assert.deepEqual(await step(0, frame(3, 1)), first, 'a fresh worker computes the same h_M');
    await session.request({ case: 'inferEnd', value: { sessionId: session.id } });
    const metrics = Buffer.from((await api(node, 'GET', '/metrics')).bytes).toString('utf8');
    assert.match(metrics, /^tandem_split_inference_kv_cache_bytes 0$/m);
  });

  it('on a node whose middle runs on ONNX Runtime, the middle\'s cache is kept there too, and the tokens are the same', async () => {
    const ortNode = await startTestNode({ backend: 'cpu', engine: 'ort-cpu' });
    const ortKey = await createTenantKey(ortNode, 'owner');
    const ortClient = await connectCloud(ortNode.url, { key: ortKey });
    try {
      const contentHash = ((await api(ortNode, 'GET', '/v1/models', ortKey)).json.models as { contentHash: string }[])[0].contentHash;
      const s = await ortClient.openSession({ model: { id: 'stories260K', contentHash }, cut: CUT, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
      const tokenizer = await loadTokenizer(STORIES_DIR);
      const ids = tokenizer.encode('Lily and her mom went to the park');
      const local = await loadAdapter(full, adapterDir);
      const want = generate(full, ids, { maxNewTokens: 16, temperature: 0, hooks: local.hooks }).generatedIds;
      local.dispose();
      const onEdgeAdapter = await loadAdapter(edge, adapterDir);
      const got = await splitGenerate(s, edge, ids, { maxNewTokens: 16, temperature: 0 }, onEdgeAdapter);
      onEdgeAdapter.dispose();
      assert.deepEqual(got.generatedIds, want);
      assert.equal(ortNode.compute.backend, 'ort-cpu');
    } finally {
      ortClient.close();
      await ortNode.close();
    }
  });

  it('one tenant\'s sessions share a KV budget of their own: over it they are refused, other tenants are served', async () => {
    // stories260K, cut (2, 2): one middle block, 256 bytes of KV a token; a 32-token step keeps 8 KiB of KV and 16 KiB of h_B and h_M.
    const small = await startTestNode({ backend: 'cpu', splitInference: { perTenantBytes: 40_000 } });
    const clients: CloudClient[] = [];
    try {
      const open = async (tenant: string): Promise<EdgeSession> => {
        const tenantKey = await createTenantKey(small, tenant);
        const c = await connectCloud(small.url, { key: tenantKey });
        clients.push(c);
        const contentHash = ((await api(small, 'GET', '/v1/models', tenantKey)).json.models as { contentHash: string }[])[0].contentHash;
        return c.openSession({ model: { id: 'stories260K', contentHash }, cut: CUT, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
      };
      const frame = encodeTensor(new Float32Array(32 * loaded.config.hiddenSize).map((_, i) => Math.cos(i)), [1, 32, loaded.config.hiddenSize], { codec: 'f32' }, { name: 'h_B' });
      const step = (s: EdgeSession) => s.request({ case: 'inferStep', value: { sessionId: s.id, position: 0, frames: [frame] } });
      const [a1, a2, b1] = [await open('ann'), await open('ann'), await open('ben')];
      assert.equal((await step(a1)).body.case, 'inferStepResult');
      await assert.rejects(step(a2), (err: { remoteCode?: string; message: string }) => err.remoteCode === 'TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED' && /tenant ann's sessions/.test(err.message));
      assert.equal((await step(b1)).body.case, 'inferStepResult', 'another tenant is served');
      await a1.request({ case: 'inferEnd', value: { sessionId: a1.id } });
      assert.equal((await step(a2)).body.case, 'inferStepResult', 'freed by InferEnd');
    } finally {
      for (const c of clients) c.close();
      await small.close();
    }
  });

  it('refuses an adapter that changes the middle blocks before anything is sent', async () => {
    const fullAdapter = createAdapter(full, [{ method: 'lora', r: 2, initLoraWeights: false, targetModules: ['q_proj'], layersToTransform: [2] }], { seed: 1 });
    await assert.rejects(splitGenerate(session, edge, [1, 2, 3], { maxNewTokens: 2, temperature: 0 }, fullAdapter), { code: 'TANDEM_EDGE_OPTION_INVALID' });
    fullAdapter.dispose();
  });
});
