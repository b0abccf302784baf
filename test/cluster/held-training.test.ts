// A middle LoRA held by a cluster (protocol 1.3): the gateway holds the adapter, its AdamW
// state and its checkpoint in JetStream, the workers compute with the factors sent along. The
// run takes the steps local training of the same three-part adapter takes, through two workers
// of one range, through a two-range pipeline, and across a gateway killed mid-training (the
// other gateway reads the adapter, and the step in progress, from JetStream).
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Kvm } from '@nats-io/kv';
import { Objm } from '@nats-io/obj';
import { unpack } from 'msgpackr';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { HELD_HEADS_BUCKET, HELD_OBJECTS_BUCKET } from '../../cloud-node/state/jetstream-held-adapter-store.ts';
import { initBackend } from '../../model/index.ts';
import type { MethodSpec } from '../../model/index.ts';
import { metric } from '../cloud-node/helpers.ts';
import { trainReference } from '../edge-client/helpers.ts';
import { freePort, startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { LORA, RUN, maxAdapterDiff, onCluster, spawnGateway, startGateway, startWorker, stopChild, tempDir, trainThrough } from './helpers.ts';

const TARGETS = ['q_proj', 'v_proj'];
/** The middle part as local training creates it: the adapter's second method, on the middle blocks of cut (1, 1). */
const MIDDLE: MethodSpec = { method: 'lora', r: 4, loraAlpha: 8, targetModules: TARGETS, layersToTransform: [1, 2, 3] };
const HELD = { middleLora: { r: 4, alpha: 8, targets: TARGETS }, gradientAccumulationSteps: 2 };

/** What the cluster's buckets for held adapters hold: live heads and live objects. */
async function heldInJetStream(url: string): Promise<{ heads: number; objects: number }> {
  const nc = await connectNats(url, 'test-held', 'gateway');
  try {
    const heads = await new Kvm(nc).open(HELD_HEADS_BUCKET);
    let count = 0;
    for await (const _ of await heads.keys()) count++;
    const objects = await (await new Objm(nc).open(HELD_OBJECTS_BUCKET)).list();
    return { heads: count, objects: objects.filter((o) => !o.deleted).length };
  } finally {
    await nc.drain();
  }
}

describe('a middle LoRA held by a NATS cluster (stories260K, cut (1, 1), f32)', () => {
  let nats: TestNatsServer;
  let reference: { losses: number[]; adapter: Map<string, Float32Array> };
  before(async () => {
    await initBackend({ backend: 'wasm' });
    nats = await startNatsServer();
    reference = await trainReference({ methods: [...LORA, MIDDLE], ...RUN, gradientAccumulationSteps: 2 });
  });
  after(() => nats.close());

  const same = (run: { losses: number[]; adapter: Map<string, Float32Array> }): void => {
    assert.equal(run.losses.length, RUN.steps);
    run.losses.forEach((loss, i) => assert.ok(Math.abs(loss - reference.losses[i]) <= 1e-5, `step ${i + 1}: cluster ${loss} vs local ${reference.losses[i]}`));
    const diff = maxAdapterDiff(reference.adapter, run.adapter);
    assert.ok(diff <= 1e-5, `adapters differ by ${diff}`);
    const middleB = run.adapter.get('base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight');
    assert.ok(middleB !== undefined && middleB.some((v) => v !== 0), 'the middle LoRA trained');
  };

  it('a gateway and two workers train as local training does; the checkpoint leaves JetStream with the session', async () => {
    await onCluster(nats.url, [undefined, undefined], async (gateway) => {
      same(await trainThrough(gateway.url, gateway.adminKey as string, HELD));
      assert.deepEqual(await heldInJetStream(nats.url), { heads: 0, objects: 0 }, 'the session closed at the end of the run: its head and objects are deleted');
    });
  });

  it('a two-range pipeline (blocks 1-2 and 2-4): each range gets its part of the factors, and the run is the same', async () => {
    await onCluster(nats.url, ['1-2', '2-4'], async (gateway) => same(await trainThrough(gateway.url, gateway.adminKey as string, HELD)));
  });

  it('an edge given two gateways: the first is killed (SIGKILL) mid-step, the second reads the adapter and the step in progress from JetStream; no step is lost or applied twice', async () => {
    const worker = await startWorker(nats.url);
    const state = await tempDir('gateways');
    // The admin key of the cluster was made by the first test's gateway, in JetStream.
    const first = await startGateway(nats.url);
    const admin = first.adminKey as string;
    await first.remove();
    const a = await spawnGateway(nats.url, `${state.dir}/a`, await freePort());
    const b = await spawnGateway(nats.url, `${state.dir}/b`, await freePort());
    // Killed once the first backward of step 2 is checkpointed and answered on a (its second
    // backward is on its way to a worker): step 1 committed, step 2 half done. The test watches
    // the heads bucket, and the requests to the workers.
    const nc = await connectNats(nats.url, 'test-held-watch', 'gateway');
    let halfway = false;
    let killed = false;
    const watch = await (await new Kvm(nc).open(HELD_HEADS_BUCKET)).watch({ include: 'updates' });
    const watching = (async () => {
      for await (const e of watch) {
        const head = e.operation === 'PUT' ? e.json<{ gradients: { step: number; files: unknown[] } | null }>() : undefined;
        if (head?.gradients?.step === 2 && head.gradients.files.length === 1) halfway = true;
      }
    })();
    nc.subscribe('tandem.middle.>', {
      callback: (err, msg) => {
        if (err !== null || !halfway || killed) return;
        const request = unpack(msg.data) as { op?: string; lora?: unknown };
        if (request.op !== 'backward' || request.lora === undefined) return;
        killed = true;
        a.child.kill('SIGKILL');
      },
    });
    try {
      const run = await trainThrough(`${a.url},${b.url}`, admin, { ...HELD, requestTimeoutMs: 8000 });
      assert.ok(killed, 'the first gateway was killed mid-step');
      assert.equal(await metric(b, 'tandem_held_commits_total{outcome="applied"}', admin), 2, 'the second gateway applied steps 3 and 4 (the third from the gradients the first checkpointed, and its own)');
      same(run);
      assert.deepEqual(await heldInJetStream(nats.url), { heads: 0, objects: 0 }, 'closed on the second gateway: nothing is left, not even what the killed one wrote last');
    } finally {
      watch.stop();
      await watching;
      await nc.drain();
      await stopChild(a.child);
      await stopChild(b.child);
      await state.remove();
      await worker.close();
    }
  });
});
