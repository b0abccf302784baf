// The edge part a node serves for a cut: built a slice at a time, the same bytes as one
// serialization of the edge's tensors, shared by concurrent requests, kept for the next ones.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ServedModel } from '../../cloud-node/served-model.ts';
import { onEdge, parseModelConfig, saveModelFolder, serializeSafetensors } from '../../model/index.ts';
import type { SafetensorsTensorInput } from '../../model/index.ts';
import { randomWeights } from '../../model/testing.ts';
import { EDGE_WEIGHTS_FILE } from '../../protocol/index.ts';

// An embedding of 6000 x 256 float32 (6.1 MB): larger than the build's 4 MiB slice, so the file
// is read out of it in pieces, rows split where a slice ends.
const RAW_CONFIG = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 256, intermediate_size: 512, num_hidden_layers: 4,
  num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 6000, max_position_embeddings: 256, rms_norm_eps: 1e-5, rope_theta: 10000,
  hidden_act: 'silu', tie_word_embeddings: false, torch_dtype: 'float32',
};

let work: string;
let served: ServedModel;
const weights = randomWeights(parseModelConfig(RAW_CONFIG), 3);

function joined(pieces: readonly Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(pieces));
}

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'tandem-served-'));
  await saveModelFolder(join(work, 'm'), RAW_CONFIG, weights);
  served = await ServedModel.load(join(work, 'm'));
});

after(async () => {
  served.dispose();
  await rm(work, { recursive: true, force: true });
});

describe('ServedModel.edgeBundle', () => {
  it('sends, in pieces, exactly the one-piece serialization of the edge tensors, with its size and sha256', async () => {
    for (const cut of [{ bottom: 1, top: 1 }, { bottom: 0, top: 2 }]) {
      const bundle = await served.edgeBundle(cut);
      const pieces = bundle.contents.get(EDGE_WEIGHTS_FILE);
      assert.ok(pieces !== undefined);
      assert.ok(pieces.length > 3, 'the embedding and the head were read in more than one slice each');
      const edge = new Map<string, SafetensorsTensorInput>();
      for (const [name, t] of weights) if (onEdge(name, cut, 4)) edge.set(name, { dtype: 'F32', shape: t.shape, data: t.data });
      const want = serializeSafetensors(edge, { format: 'pt', contentHash: served.contentHash, bottom: String(cut.bottom), top: String(cut.top) });
      const got = joined(pieces);
      assert.equal(got.byteLength, want.byteLength);
      assert.ok(Buffer.from(got).equals(Buffer.from(want)), `cut ${JSON.stringify(cut)}: the same bytes`);
      const listed = bundle.files.find((f) => f.name === EDGE_WEIGHTS_FILE);
      assert.deepEqual(listed, { name: EDGE_WEIGHTS_FILE, bytes: want.byteLength, sha256: createHash('sha256').update(want).digest('hex') });
      for (const file of bundle.files.filter((f) => f.name !== EDGE_WEIGHTS_FILE)) {
        const bytes = joined(bundle.contents.get(file.name) ?? []);
        assert.equal(file.sha256, createHash('sha256').update(bytes).digest('hex'), file.name);
      }
    }
  });

  it('shares one build among concurrent requests for a cut, keeps it for the next, and refuses a bad cut before building', async () => {
    const cut = { bottom: 2, top: 1 };
    const [a, b] = await Promise.all([served.edgeBundle(cut), served.edgeBundle({ ...cut })]);
    assert.equal(a, b, 'one build for both');
    assert.equal(await served.edgeBundle(cut), a, 'kept');
    await assert.rejects(served.edgeBundle({ bottom: 2, top: 2 }), { code: 'TANDEM_CUT_INVALID' });
    // Builds for different cuts queue behind each other and each answers its own cut.
    const cuts = [{ bottom: 0, top: 1 }, { bottom: 1, top: 2 }, { bottom: 0, top: 3 }];
    const bundles = await Promise.all(cuts.map((c) => served.edgeBundle(c)));
    assert.deepEqual(bundles.map((x) => x.cut), cuts);
  });

  it('lets the event loop turn between the slices of a build', async () => {
    const fresh = await ServedModel.load(join(work, 'm'));
    try {
      let turns = 0;
      let building = true;
      const spin = (): void => {
        turns += 1;
        if (building) setImmediate(spin);
      };
      setImmediate(spin);
      const bundle = await fresh.edgeBundle({ bottom: 1, top: 1 });
      building = false;
      const pieces = bundle.contents.get(EDGE_WEIGHTS_FILE) ?? [];
      // Built in one go, the build would have let the loop turn once or twice.
      assert.ok(turns >= pieces.length / 2, `${turns} turns of the event loop for ${pieces.length} pieces`);
    } finally {
      fresh.dispose();
    }
  });
});
