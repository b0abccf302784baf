// Adapters trained against an emulator are saved in the full model's block numbers and plug
// into the full model with loadAdapter, touching only the bottom and top blocks.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { trainOffsite } from '../../edge-client/index.ts';
import type { OffsiteTrainOptions } from '../../edge-client/index.ts';
import { EmulatorError, OFFSITE_FILE, buildEmulator, checkAdapterBase, emulatedSpecs, emulatorLayout, readOffsiteRecord } from '../../emulator/index.ts';
import { DEFAULT_RECIPE, LlamaModel, initBackend, loadAdapter, loadModelFolder, readSafetensorsFile, toFloat32 } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
let work = '';
let bundleDir = '';

before(async () => {
  await initBackend({ backend: 'wasm' });
  work = await mkdtemp(join(tmpdir(), 'tandem-offsite-'));
  await writeFile(join(work, 'train.txt'), 'The cat sat on the mat. The dog ran to the park and played with a ball.\n'.repeat(10));
  bundleDir = join(work, 'bundle');
  await buildEmulator({ modelDir: fixture, keep: 2, cut: { bottom: 1, top: 1 }, outDir: bundleDir });
});
after(() => rm(work, { recursive: true, force: true }));

function options(outDir: string, methods: OffsiteTrainOptions['methods']): OffsiteTrainOptions {
  return { ...DEFAULT_RECIPE, bundleDir, dataFile: join(work, 'train.txt'), outDir, methods, steps: 2, batchSize: 2, seqLen: 16, lr: 0.01, evalEvery: 0, saveEvery: 0, backend: 'wasm' };
}

describe('offsite adapters', () => {
  it('a block adapter trained on the emulator loads into the full model and changes only blocks 0 and 4', async () => {
    const result = await trainOffsite(options(join(work, 'block'), [{ method: 'block' }]));
    assert.ok(result.adapterDir && result.emulatedAdapterDir);
    const record = JSON.parse(await readFile(join(result.adapterDir, OFFSITE_FILE), 'utf8')) as { baseModel: { contentHash: string }; keptLayers: number[] };
    const full = await loadModelFolder(fixture);
    assert.equal(record.baseModel.contentHash, `sha256:${full.contentHash}`);
    assert.deepEqual(record.keptLayers, [1, 3]);

    const config = JSON.parse(await readFile(join(result.adapterDir, 'adapter_config.json'), 'utf8')) as { layers_to_transform: number[] };
    assert.deepEqual(config.layers_to_transform, [0, 4]);
    // The emulated model's top block 3 is the full model's block 4, value for value.
    const emulatedSaved = await readSafetensorsFile(join(result.emulatedAdapterDir, 'adapter_model.safetensors'));
    const fullSaved = await readSafetensorsFile(join(result.adapterDir, 'adapter_model.safetensors'));
    const name = (l: number) => `model.layers.${l}.mlp.down_proj.weight`;
    assert.deepEqual(toFloat32(fullSaved.tensors.get(name(4))!, 'full', name(4)), toFloat32(emulatedSaved.tensors.get(name(3))!, 'emulated', name(3)));

    const model = LlamaModel.fromArrays(full.config, full.weights);
    const adapter = await loadAdapter(model, result.adapterDir);
    try {
      let changed = 0;
      for (const [n, v] of model.weights) {
        const before = full.weights.get(n)!.data;
        const now = v.dataSync() as Float32Array;
        const differs = now.some((x, i) => x !== before[i]);
        const layer = /^model\.layers\.(\d+)\./.exec(n)?.[1];
        if (layer === '0' || layer === '4') changed += differs ? 1 : 0;
        else assert.equal(differs, false, `${n} must not change`);
      }
      assert.ok(changed > 0, 'the bottom and top blocks carry the trained values');
    } finally {
      adapter.dispose();
      model.dispose();
    }
  });

  it('a LoRA adapter plugs into the full model with keys on blocks 0 and 4 only', async () => {
    const result = await trainOffsite(options(join(work, 'lora'), [{ method: 'lora', r: 2, targetModules: ['q_proj', 'v_proj'] }]));
    const saved = await readSafetensorsFile(join(result.adapterDir!, 'adapter_model.safetensors'));
    const layers = new Set([...saved.tensors.keys()].map((k) => /model\.layers\.(\d+)\./.exec(k)?.[1]));
    assert.deepEqual([...layers].sort(), ['0', '4']);
    const full = await loadModelFolder(fixture);
    const model = LlamaModel.fromArrays(full.config, full.weights);
    const adapter = await loadAdapter(model, result.adapterDir!);
    adapter.dispose();
    model.dispose();
  });

  it('refuses adapters on middle blocks, in the full model\'s numbers', () => {
    const layout = emulatorLayout(5, { bottom: 1, top: 1 }, 2);
    assert.deepEqual(emulatedSpecs([{ method: 'lora', layersToTransform: [4] }], layout), [{ method: 'lora', layersToTransform: [3] }]);
    assert.throws(() => emulatedSpecs([{ method: 'lora', layersToTransform: [0, 3] }], layout), (e: unknown) => e instanceof EmulatorError && e.code === 'TANDEM_OFFSITE_LAYER_INVALID' && /block 3/.test(e.message));
  });

  it('checks the base model an adapter was trained against, with or without the sha256: prefix', async () => {
    const hash = 'ab'.repeat(32);
    checkAdapterBase(`sha256:${hash}`, hash);
    checkAdapterBase(hash.toUpperCase(), `sha256:${hash}`);
    assert.throws(() => checkAdapterBase(`sha256:${'cd'.repeat(32)}`, `sha256:${hash}`, 'stories260K'), (e: unknown) => e instanceof EmulatorError && e.code === 'TANDEM_ADAPTER_BASE_MISMATCH' && /stories260K/.test(e.message));
    await assert.rejects(readOffsiteRecord(work), (e: unknown) => e instanceof EmulatorError && e.code === 'TANDEM_OFFSITE_RECORD_INVALID');
  });
});
