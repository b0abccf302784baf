// A worker checks every request against its model before anything computes: a forward whose
// hidden size is not the model's, one longer than the context, and a backward whose g does
// not have its tape's shape are each answered `invalid` with the field, and the worker goes
// on serving (a poison request does not crash it or cost other tenants their tapes). So are
// held adapters' factors that are not linear modules of the request's blocks (by layer, group
// and name, as the model writes them), not their shape, of two ranks, or an (IA)^3 scale on the
// wrong side; good ones are computed and their gradients answered.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { decodeReply, encodeRequest, rangeSubject, workerSubject } from '../../cloud-node/cluster/wire.ts';
import type { MiddleRequest } from '../../cloud-node/cluster/wire.ts';
import type { MiddleWorkerNode } from '../../cloud-node/index.ts';
import { initBackend } from '../../model/index.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { startWorker } from './helpers.ts';

describe('a worker checks requests against its model', () => {
  let nats: TestNatsServer;
  let worker: MiddleWorkerNode;
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    worker = await startWorker(nats.url);
  });
  after(async () => {
    await worker?.close();
    await nats?.close();
  });

  it('a wrong hidden size, a sequence over the context and a g unlike its tape are refused; the worker still serves', async () => {
    const nc = await connectNats(nats.url, 'test-gateway', 'gateway');
    const ask = async (subject: string, request: MiddleRequest, elements: number) => decodeReply((await nc.request(subject, encodeRequest(request), { timeout: 20_000 })).data, elements);
    const range = rangeSubject(worker.contentHash, worker.blocks);
    const blocks = { start: 1, end: 4 };
    try {
      const wrongHidden = await ask(range, { op: 'forward', blocks, shape: [1, 8, 7], h: new Float32Array(56), keepTape: false }, 56);
      assert.equal(wrongHidden.ok, false);
      assert.match(wrongHidden.ok ? '' : wrongHidden.message, /hidden size 7 is not the model's 64/);
      const long = await ask(range, { op: 'forward', blocks, shape: [1, 600, 64], h: new Float32Array(600 * 64), keepTape: false }, 600 * 64);
      assert.match(long.ok ? '' : long.message, /over the model's context of 512/);
      const kept = await ask(range, { op: 'forward', blocks, shape: [1, 8, 64], h: new Float32Array(8 * 64).fill(0.1), keepTape: true }, 8 * 64);
      assert.ok(kept.ok && kept.tapeId !== undefined, 'a good forward keeps its tape');
      const tapeId = (kept as { tapeId: number }).tapeId;
      const unlike = await ask(workerSubject(worker.id), { op: 'backwardFromTape', tapeId, shape: [2, 4, 64], g: new Float32Array(8 * 64) }, 8 * 64);
      assert.equal(unlike.ok, false);
      assert.match(unlike.ok ? '' : unlike.message, /is not the shape of tape/);
      const good = await ask(range, { op: 'forward', blocks, shape: [1, 8, 64], h: new Float32Array(8 * 64).fill(0.1), keepTape: false }, 8 * 64);
      assert.ok(good.ok, 'the worker still serves');
    } finally {
      await nc.drain();
    }
  });

  it("a held adapter's factors outside the request's blocks, of another shape or named twice are refused; good ones answer their gradients", async () => {
    const nc = await connectNats(nats.url, 'test-gateway-held', 'gateway');
    const range = rangeSubject(worker.contentHash, worker.blocks);
    const ask = async (request: MiddleRequest, elements: number, loraLengths?: number[]) => decodeReply((await nc.request(range, encodeRequest(request), { timeout: 20_000 })).data, elements, loraLengths);
    const blocks = { start: 1, end: 4 };
    const shape: [number, number, number] = [1, 8, 64];
    const h = new Float32Array(8 * 64).fill(0.1);
    // stories260K: hidden 64, 8 heads of 8, 4 KV heads: q_proj is [64, 64], v_proj [32, 64].
    const module = (path: string, outFeatures: number, inFeatures = 64, r = 2) => ({ path, r, inFeatures, outFeatures, a: new Float32Array(r * inFeatures).fill(0.01), b: new Float32Array(outFeatures * r).fill(0.02) });
    const lora = (...modules: ReturnType<typeof module>[]) => ({ scale: 2, modules });
    try {
      const outside = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.4.self_attn.q_proj', 64)) }, h.length);
      assert.match(outside.ok ? '' : outside.message, /model\.layers\.4\.self_attn\.q_proj is not a linear module of blocks \[1, 4\)/);
      const unknown = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.2.self_attn.rotary', 64)) }, h.length);
      assert.match(unknown.ok ? '' : unknown.message, /is not a linear module/);
      const wrongShape = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.2.self_attn.v_proj', 64)) }, h.length);
      assert.match(wrongShape.ok ? '' : wrongShape.message, /v_proj is \[32, 64\], not \[64, 64\]/);
      const twice = await ask({ op: 'backward', blocks, shape, h, g: h, lora: lora(module('model.layers.2.self_attn.q_proj', 64), module('model.layers.2.self_attn.q_proj', 64)) }, h.length);
      assert.match(twice.ok ? '' : twice.message, /names a module twice/);
      // What once reached ONNX Runtime and ended its compute thread: a name in another group, a
      // layer written with a leading zero (the same module under a second path), modules of two ranks.
      const group = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.2.mlp.q_proj', 64)) }, h.length);
      assert.match(group.ok ? '' : group.message, /mlp\.q_proj is not a linear module/);
      const zero = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.2.self_attn.q_proj', 64), module('model.layers.02.self_attn.q_proj', 64)) }, h.length);
      assert.match(zero.ok ? '' : zero.message, /layers\.02\.self_attn\.q_proj is not a linear module/);
      const ranks = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: lora(module('model.layers.2.self_attn.q_proj', 64), module('model.layers.3.self_attn.q_proj', 64, 64, 3)) }, h.length);
      assert.match(ranks.ok ? '' : ranks.message, /lora\.modules\[1\]\.r is invalid: 3: the modules of one adapter have one rank \(2\)/);
      const ia3 = { scale: 1, modules: [], ia3: [{ path: 'model.layers.2.mlp.down_proj', feedforward: false, scale: new Float32Array(64).fill(1) }] };
      const flag = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: ia3 }, h.length);
      assert.match(flag.ok ? '' : flag.message, /down_proj is a feed-forward module/);
      const good = lora(module('model.layers.2.self_attn.q_proj', 64), module('model.layers.3.self_attn.v_proj', 32));
      const forward = await ask({ op: 'forward', blocks, shape, h, keepTape: false, lora: good }, h.length);
      const plain = await ask({ op: 'forward', blocks, shape, h, keepTape: false }, h.length);
      assert.ok(forward.ok && plain.ok);
      assert.ok(forward.output.some((v, i) => Math.abs(v - plain.output[i]) > 1e-6), 'the factors change the output');
      const lengths = good.modules.flatMap((m) => [m.a.length, m.b.length]);
      const backward = await ask({ op: 'backward', blocks, shape, h, g: h, lora: good }, h.length, lengths);
      assert.ok(backward.ok && backward.loraGrads !== undefined);
      assert.deepEqual(backward.loraGrads.map((g) => g.length), lengths, 'A then B of each module, in its order');
      assert.ok(backward.loraGrads.every((g) => g.every(Number.isFinite)) && backward.loraGrads[0].some((v) => v !== 0));
    } finally {
      await nc.drain();
    }
  });
});
