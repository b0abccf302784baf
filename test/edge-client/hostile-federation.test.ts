// An owner in a federation against a hostile cloud (a real node behind a man-in-the-middle that
// rewrites its REST replies): every reply is checked whole as it arrives. A round and attempt that
// are not integers never name a folder (a sentinel outside the work folder survives), an unknown
// SecAgg phase is refused, a round past its deadline ends the wait, and a proposed cut with no
// block at the bottom is refused before anything is downloaded. The same proxy passing the
// node's replies unchanged, the owner takes part in the round (the checks take what the node sends),
// and an owner that trains longer than the round's owner timeout beats and is not taken as gone.
import assert from 'node:assert/strict';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { EdgeError, federate, readAdapterFolder } from '../../edge-client/index.ts';
import type { FederateOptions, FederateRoundEvent } from '../../edge-client/index.ts';
import { LlamaModel, createAdapter, initBackend, loadModelFolder, saveAdapter } from '../../model/index.ts';
import type { FederationCreate, WireAdapter } from '../../protocol/index.ts';
import { FIXTURE, MODEL_ID, startTestCloud, tempDir } from './helpers.ts';
import type { TestCloud } from './helpers.ts';
import { startHostileCloud } from './hostile-cloud-proxy.ts';
import type { HostileCloudHooks } from './hostile-cloud-proxy.ts';

let cloud: TestCloud;
let scratch: { dir: string; remove(): Promise<void> };
let aliceKey: string;
let bobKey: string;
/** Eight short rows: a round's training and evaluation take a fraction of a second. */
let data: string;
let offsiteAdapter: WireAdapter;
let splitAdapter: WireAdapter;

async function post(path: string, key: string, body: unknown): Promise<Record<string, unknown>> {
  const res = await fetch(`${cloud.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = (await res.json()) as Record<string, unknown>;
  assert.ok(res.ok, JSON.stringify(json));
  return json;
}

/** LoRA r=2 on q_proj and v_proj of stories260K (on blocks 0 and 4 only: the edge's at cut (1, 1)), as the wire carries it. */
async function loraAdapter(layers?: number[]): Promise<WireAdapter> {
  const loaded = await loadModelFolder(FIXTURE);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const adapter = createAdapter(model, [{ method: 'lora', r: 2, loraAlpha: 4, targetModules: ['q_proj', 'v_proj'], ...(layers ? { layersToTransform: layers } : {}) }], { seed: 3 });
  const dir = join(scratch.dir, `init-${layers?.join('-') ?? 'all'}`);
  await saveAdapter(adapter, dir);
  adapter.dispose();
  model.dispose();
  return readAdapterFolder(dir);
}

before(async () => {
  await initBackend({ backend: 'wasm' });
  cloud = await startTestCloud();
  scratch = await tempDir('hostile-federation');
  data = join(scratch.dir, 'owner.jsonl');
  await writeFile(data, Array.from({ length: 8 }, (_, i) => `${JSON.stringify({ text: `the cat sat on the mat ${i}.` })}\n`).join(''));
  aliceKey = (await post('/v1/keys', cloud.key, { tenant: 'alice' })).key as string;
  bobKey = (await post('/v1/keys', cloud.key, { tenant: 'bob' })).key as string;
  offsiteAdapter = await loraAdapter();
  splitAdapter = await loraAdapter([0, 4]);
});
after(async () => {
  await cloud.close();
  await scratch.remove();
});

/** `key`'s owner in `federation` through `url` until its first attempt ends (its round event): that event. */
async function firstAttempt(url: string, key: string, federation: string): Promise<FederateRoundEvent[]> {
  const events: FederateRoundEvent[] = [];
  const stop = new Error('stop after the first attempt');
  const ended = await federate({
    cloud: url, key, federation, data, modelDir: FIXTURE, workDir: join(scratch.dir, `work-${federation}`), pollMs: 20, maxRounds: 1,
    backend: 'wasm', recipe: { batchSize: 2, seqLen: 16 },
    onRound: (e) => {
      events.push(e);
      throw stop;
    },
  }).then(() => undefined, (e: unknown) => e);
  assert.equal(ended, stop);
  return events;
}

/** A federation of alice and bob, both sampled; only alice runs here, so a SecAgg round waits for bob's keys. */
async function createFederation(id: string, body: Partial<FederationCreate> = {}): Promise<void> {
  await post('/v1/federations', cloud.key, {
    id, model: MODEL_ID, mode: 'offsite', adapter: offsiteAdapter, rounds: 1, owners: ['alice', 'bob'], sampleSize: 2, minOwners: 1, localSteps: 1,
    roundDeadlineSeconds: 600, aggregation: 'fedavg', secureAggregation: false, ...body,
  } satisfies FederationCreate);
}

/** Rewrites the JSON of REST replies whose path `matches`: the first `times` of them only. */
function rewrite(matches: (path: string) => boolean, change: (json: Record<string, unknown>) => void, times = Infinity): Rewrite {
  let left = times;
  return (path, body) => {
    if (!matches(path) || left <= 0) return body;
    left--;
    const json = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
    change(json);
    return Buffer.from(JSON.stringify(json));
  };
}
type Rewrite = NonNullable<HostileCloudHooks['rest']>;
const isRound = (path: string): boolean => path.endsWith('/round');
/** Without the checks, a case loops or waits for good: it fails by this timeout. */
const QUICK = { timeout: 30_000 };

/** alice's federate through the rewriting proxy; resolves with the error (of `code`) it ended with and the paths it asked for. */
async function refused(federation: string, rest: Rewrite, code: string, options: Partial<FederateOptions> = {}): Promise<{ error: EdgeError; paths: string[]; sessions: number }> {
  const paths: string[] = [];
  const hostile = await startHostileCloud(cloud.url, { rest: (path, body) => {
    paths.push(path);
    return rest(path, body);
  } });
  try {
    const error = await federate({
      cloud: hostile.url, key: aliceKey, federation, data, modelDir: FIXTURE, workDir: join(scratch.dir, `work-${federation}`), pollMs: 20, maxRounds: 1,
      backend: 'wasm', unreachableMs: 5_000, recipe: { batchSize: 2, seqLen: 16 }, ...options,
    }).then(() => assert.fail('federate took part in the round'), (e: unknown) => e);
    assert.ok(error instanceof EdgeError, String(error));
    assert.equal(error.code, code, error.message);
    return { error, paths, sessions: hostile.sent.length };
  } finally {
    await hostile.close();
  }
}

describe('an owner in a federation against a hostile cloud', () => {
  it('takes part in a round of the same proxy when nothing is rewritten', QUICK, async () => {
    await createFederation('honest');
    const hostile = await startHostileCloud(cloud.url);
    try {
      const result = await federate({
        cloud: hostile.url, key: aliceKey, federation: 'honest', data, modelDir: FIXTURE, workDir: join(scratch.dir, 'work-honest'), pollMs: 20, maxRounds: 1,
        backend: 'wasm', recipe: { batchSize: 2, seqLen: 16 },
      });
      assert.equal(result.rounds[0].ack?.accepted, true);
      assert.equal(result.rounds[0].ack?.round, 1);
    } finally {
      await hostile.close();
    }
  });

  it('an owner that trains longer than the owner timeout beats while it does, and its update is taken', async () => {
    // alice is done at once; bob takes 3 s before training (its onTraining), three owner timeouts: without
    // his heartbeats the round would close with alice alone (minOwners 1) and refuse his update as late.
    await createFederation('beats', { ownerTimeoutSeconds: 1 });
    const beats: unknown[] = [];
    const watched = await startHostileCloud(cloud.url, { rest: (path, body) => {
      if (path.endsWith('/alive')) beats.push((JSON.parse(body.toString('utf8')) as { current: unknown }).current);
      return body;
    } });
    const owner = (url: string, key: string, name: string, onTraining?: () => Promise<void>) => federate({
      cloud: url, key, federation: 'beats', data, modelDir: FIXTURE, workDir: join(scratch.dir, `work-beats-${name}`), pollMs: 20, maxRounds: 1,
      backend: 'wasm', recipe: { batchSize: 2, seqLen: 16 }, onTraining,
    });
    try {
      const [alice, bob] = await Promise.all([
        owner(cloud.url, aliceKey, 'alice'),
        owner(watched.url, bobKey, 'bob', () => new Promise((r) => setTimeout(r, 3_000))),
      ]);
      assert.equal(alice.rounds[0].ack?.accepted, true);
      assert.equal(bob.rounds[0].ack?.accepted, true, JSON.stringify(bob.rounds[0].refused));
      assert.ok(beats.length >= 3 && beats.every((c) => c === true), `bob's heartbeats: ${JSON.stringify(beats)}`);
      const status = (await (await fetch(`${cloud.url}/v1/federations/beats`, { headers: { authorization: `Bearer ${cloud.key}` } })).json()) as { history: { participants: string[] }[] };
      assert.deepEqual(status.history[0].participants, ['alice', 'bob']);
    } finally {
      await watched.close();
    }
  });

  it('an owner whose round moved on without it (its heartbeat says so) stops training at its next step', async () => {
    // bob alone, 100,000 local steps (minutes here), a 2 s deadline: the round is retried without
    // his update, and his next beat, answered current: false, ends his training.
    await createFederation('stops', { roundDeadlineSeconds: 2, localSteps: 100_000 });
    const events = await firstAttempt(cloud.url, bobKey, 'stops');
    assert.equal(events[0].refused, 'TANDEM_EDGE_ROUND_MOVED_ON');
    assert.equal(events[0].ack, undefined, 'no update was sent');
  });

  it('refuses a round and attempt that are not integers before they name a folder: nothing outside the work folder is touched', QUICK, async () => {
    await createFederation('escape');
    const victim = join(scratch.dir, 'victim');
    await mkdir(join(victim, 'sub'), { recursive: true });
    await writeFile(join(victim, 'precious.txt'), "the owner's own files\n");
    // workDir is scratch/work-escape: round-x-/../../victim is scratch/victim.
    const { error } = await refused('escape', rewrite(isRound, (a) => {
      a.round = 'x';
      a.attempt = '/../../victim';
    }, 1), 'TANDEM_EDGE_RESPONSE_INVALID');
    assert.equal(error.field, 'round');
    assert.ok((await stat(join(victim, 'precious.txt'))).isFile(), 'the sentinel outside workDir is still there');
    assert.ok((await stat(join(victim, 'sub'))).isDirectory());
  });

  it('refuses other malformed assignments, each naming the field', QUICK, async () => {
    await createFederation('malformed');
    const cases: [string, (a: Record<string, unknown>) => void][] = [
      ['attempt', (a) => { a.attempt = -1; }],
      ['mode', (a) => { a.mode = 'anywhere'; }],
      ['deadline', (a) => { a.deadline = 'never'; }],
      // A wait ends past the deadline: one in the year 9999 would make it wait for ever.
      ['deadline', (a) => { a.deadline = '9999-12-31T00:00:00.000Z'; }],
      ['localSteps', (a) => { a.localSteps = 1e12; }],
      ['sampledOwners[0]', (a) => { a.sampledOwners = [7]; }],
      // DP noise is split by their count: a list padded with owners the round lacks would shrink each share.
      ['sampledOwners', (a) => { a.sampledOwners = [...(a.sampledOwners as string[]), ...(a.sampledOwners as string[])]; }],
      ['sampledOwners', (a) => { a.sampledOwners = ['someone-else']; }],
      ['adapter.tensors', (a) => { (a.adapter as WireAdapter).tensors = {}; }],
      ['adapter.config', (a) => { (a.adapter as WireAdapter).config = 'not json'; }],
    ];
    const tensor = Object.keys(offsiteAdapter.tensors)[0];
    cases.push([`adapter.tensors.${tensor}.shape[0]`, (a) => { (a.adapter as WireAdapter).tensors[tensor].shape[0] = 2.5; }]);
    cases.push([`adapter.tensors.${tensor}.data`, (a) => { (a.adapter as WireAdapter).tensors[tensor].data += 'AAAA'; }]);
    // Well-formed but not the tensors this config plans on this model: refused before a value is decoded.
    cases.push([`adapter.tensors.${tensor}`, (a) => { (a.adapter as WireAdapter).tensors[tensor].shape = [1, 1]; (a.adapter as WireAdapter).tensors[tensor].data = 'AAAAAA=='; }]);
    for (const [field, change] of cases) {
      const { error } = await refused('malformed', rewrite(isRound, change, 1), 'TANDEM_EDGE_RESPONSE_INVALID');
      assert.equal(error.field, field, error.message);
    }
  });

  it('refuses a SecAgg phase it does not know', QUICK, async () => {
    await createFederation('phase', { secureAggregation: true, minOwners: 2 });
    const { error } = await refused('phase', rewrite((p) => p.endsWith('/secagg'), (v) => { v.phase = 'bogus'; }), 'TANDEM_EDGE_RESPONSE_INVALID');
    assert.equal(error.field, 'phase');
  });

  it('refuses secure aggregation among other owners than the round names (their count splits the DP noise)', QUICK, async () => {
    await createFederation('owners', { secureAggregation: true, minOwners: 2 });
    const { error } = await refused('owners', rewrite((p) => p.endsWith('/secagg'), (v) => { v.sampled = [...(v.sampled as string[]), 'padding-1', 'padding-2']; }), 'TANDEM_EDGE_RESPONSE_INVALID');
    assert.equal(error.field, 'sampled');
  });

  it("a SecAgg view of a later attempt ends this attempt as the owner's own TANDEM_EDGE_ROUND_MOVED_ON, not as a code the cloud did not send", QUICK, async () => {
    await createFederation('moved', { secureAggregation: true, minOwners: 2 });
    const hostile = await startHostileCloud(cloud.url, { rest: rewrite((p) => p.endsWith('/secagg'), (v) => { v.attempt = (v.attempt as number) + 1; }, 1) });
    try {
      // The attempt refused, the owner asks for the round again; the test stops it there (bob never joins).
      const events = await firstAttempt(hostile.url, aliceKey, 'moved');
      assert.equal(events.length, 1);
      assert.equal(events[0].refused, 'TANDEM_EDGE_ROUND_MOVED_ON');
      assert.equal(events[0].ack, undefined, 'no update was sent');
    } finally {
      await hostile.close();
    }
  });

  it('stops waiting for the other owners once the round is past its deadline', QUICK, async () => {
    // bob never advertises keys, so the round stays in phase keys; the deadline is a second ago.
    await createFederation('deadline', { secureAggregation: true, minOwners: 2 });
    const { error } = await refused('deadline', rewrite(isRound, (a) => { a.deadline = new Date(Date.now() - 1000).toISOString(); }), 'TANDEM_EDGE_REQUEST_FAILED');
    assert.equal(error.field, 'deadline');
  });

  it('does not take a proposed cut with no block at the bottom (h_B would be the embeddings), and downloads nothing', QUICK, async () => {
    await createFederation('cut', { mode: 'split', cut: { bottom: 1, top: 1 }, adapter: splitAdapter });
    const split = { modelDir: undefined, cacheDir: join(scratch.dir, 'cache') };
    // The federation's cut, rewritten.
    const federation = await refused('cut', rewrite(isRound, (a) => { a.cut = { bottom: 0, top: 1 }; }), 'TANDEM_EDGE_RESPONSE_INVALID', split);
    assert.equal(federation.error.field, 'cut');
    assert.deepEqual(federation.paths.filter((p) => p.includes('/edge')), [], 'no edge part was asked for');
    assert.equal(federation.sessions, 0, 'no session was opened');
    // No cut in the assignment: the model's default cut, rewritten.
    const models = rewrite((p) => p.startsWith('/v1/models') && !p.includes('/edge'), (body) => {
      for (const m of body.models as Record<string, unknown>[]) m.defaultCut = { bottom: 0, top: 1 };
    });
    const noCut = rewrite(isRound, (a) => { delete a.cut; });
    const byModel = await refused('cut', (path, body) => models(path, noCut(path, body)), 'TANDEM_EDGE_RESPONSE_INVALID', split);
    assert.equal(byModel.error.field, 'defaultCut');
    assert.deepEqual(byModel.paths.filter((p) => p.includes('/edge')), []);
  });
});
