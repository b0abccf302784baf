// Emulator bundles on stories260K: built, read back, and every changed byte detected.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile, cp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  EMULATOR_WEIGHTS_FILE, EmulatorError, MANIFEST_FILE, buildEmulator, dequantizeInt8Rows, emulatedModel, quantizeInt8Rows, readBundle,
} from '../../emulator/index.ts';
import type { BundleManifest } from '../../emulator/index.ts';
import { initBackend, loadModelFolder, parseSafetensors, tf } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
let work = '';
let plain = '';
let manifest: BundleManifest;

const text = 'Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. One day the sun was hot and they sat under a big tree.\n';

before(async () => {
  await initBackend({ backend: 'wasm' });
  work = await mkdtemp(join(tmpdir(), 'tandem-emulator-'));
  await writeFile(join(work, 'public.txt'), text.repeat(12));
  plain = join(work, 'plain');
  manifest = await buildEmulator({ modelDir: fixture, keep: 2, cut: { bottom: 1, top: 1 }, outDir: plain, evalFile: join(work, 'public.txt'), evalRows: 4 });
});
after(() => rm(work, { recursive: true, force: true }));

function expectCode(code: string, file?: string) {
  return (e: unknown) => e instanceof EmulatorError && e.code === code && (file === undefined || (e.file ?? '').endsWith(file));
}

describe('emulator bundle', () => {
  it('round-trips: the manifest, the full model\'s bottom, top and kept blocks, and the fidelity report', async () => {
    const full = await loadModelFolder(fixture);
    assert.deepEqual(manifest.keptLayers, [1, 3]);
    assert.equal(manifest.emulatedLayers, 4);
    assert.equal(manifest.baseModel.contentHash, `sha256:${full.contentHash}`);
    assert.deepEqual(manifest.files.map((f) => f.name), ['config.json', 'edge.safetensors', 'emulator.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    const f = manifest.fidelity;
    assert.ok(f.fullPerplexity !== null && f.emulatorPerplexity !== null && f.middleCosine !== null);
    assert.ok(f.middleCosine > 0 && f.middleCosine <= 1 + 1e-6);
    assert.ok(f.sizeRatio > 0.6 && f.sizeRatio < 0.7, `2 of 3 middle blocks: ${f.sizeRatio}`);

    const bundle = await readBundle(plain);
    assert.deepEqual(bundle.manifest, manifest);
    for (const [name, w] of [...bundle.edgeWeights, ...bundle.emulatorWeights]) assert.deepEqual(w.data, full.weights.get(name)?.data, name);
    assert.deepEqual([...bundle.emulatorWeights.keys()].every((n) => /^model\.layers\.[13]\./.test(n)), true);
    assert.ok([...bundle.edgeWeights.keys()].some((n) => n.startsWith('model.layers.4.')), 'the top block keeps its full-model number on disk');

    // The emulated model runs as a 4-block LLaMA.
    const model = emulatedModel(bundle);
    try {
      assert.equal(model.numLayers, 4);
      const logits = model.forward(tf.tensor2d([[1, 403, 407]], [1, 3], 'int32'));
      assert.deepEqual(logits.shape, [1, 3, 512]);
      logits.dispose();
    } finally {
      model.dispose();
    }
  });

  it('detects a changed byte in any file, naming the file, and a changed manifest field', async () => {
    for (const name of ['edge.safetensors', EMULATOR_WEIGHTS_FILE, 'tokenizer.json']) {
      const dir = join(work, `tampered-${name}`);
      await cp(plain, dir, { recursive: true });
      const bytes = await readFile(join(dir, name));
      bytes[bytes.length - 3] ^= 1;
      await writeFile(join(dir, name), bytes);
      await assert.rejects(readBundle(dir), expectCode('TANDEM_BUNDLE_CHECKSUM_MISMATCH', name));
    }
    const dir = join(work, 'tampered-manifest');
    await cp(plain, dir, { recursive: true });
    const m = JSON.parse(await readFile(join(dir, MANIFEST_FILE), 'utf8')) as BundleManifest;
    m.keptLayers = [1, 2, 3];
    m.emulatedLayers = 5;
    await writeFile(join(dir, MANIFEST_FILE), JSON.stringify(m));
    await assert.rejects(readBundle(dir), expectCode('TANDEM_BUNDLE_CHECKSUM_MISMATCH', MANIFEST_FILE));
    await rm(join(dir, 'edge.safetensors'));
    await assert.rejects(readBundle(dir), expectCode('TANDEM_BUNDLE_INVALID', 'edge.safetensors'));
  });

  it('refuses a manifest listing a file twice or over 64 files, a named pipe in place of a file, and a file of another size before reading it (found by fuzzing)', async () => {
    const relisted = async (name: string, change: (m: BundleManifest) => void): Promise<string> => {
      const dir = join(work, name);
      await cp(plain, dir, { recursive: true });
      const m = JSON.parse(await readFile(join(dir, MANIFEST_FILE), 'utf8')) as BundleManifest;
      change(m);
      await writeFile(join(dir, MANIFEST_FILE), JSON.stringify(m));
      return dir;
    };
    // The checksum is not a signature (anyone recomputes it): these are refused before it is checked.
    const twice = await relisted('listed-twice', (m) => { m.files.push(...Array.from({ length: 3 }, () => ({ ...m.files[0] }))); });
    await assert.rejects(readBundle(twice), (e: unknown) => expectCode('TANDEM_BUNDLE_INVALID', MANIFEST_FILE)(e) && /twice/.test((e as Error).message));
    const many = await relisted('listed-many', (m) => { m.files.push(...Array.from({ length: 70 }, (_, i) => ({ name: `x${i}`, bytes: 1, sha256: m.files[0].sha256 }))); });
    await assert.rejects(readBundle(many), (e: unknown) => expectCode('TANDEM_BUNDLE_INVALID', MANIFEST_FILE)(e) && /over the limit of 64/.test((e as Error).message));
    const pipe = join(work, 'fifo-bundle');
    await cp(plain, pipe, { recursive: true });
    await rm(join(pipe, 'tokenizer.json'));
    execFileSync('mkfifo', [join(pipe, 'tokenizer.json')]);
    await assert.rejects(readBundle(pipe), (e: unknown) => expectCode('TANDEM_BUNDLE_INVALID', 'tokenizer.json')(e) && /not a regular file/.test((e as Error).message));
    const longer = join(work, 'longer-bundle');
    await cp(plain, longer, { recursive: true });
    await writeFile(join(longer, 'tokenizer.json'), Buffer.concat([await readFile(join(plain, 'tokenizer.json')), Buffer.from(' ')]));
    await assert.rejects(readBundle(longer), (e: unknown) => expectCode('TANDEM_BUNDLE_CHECKSUM_MISMATCH', 'tokenizer.json')(e) && /bytes; the manifest records/.test((e as Error).message));
  });

  it('stores int8 emulator weights as I8 with per-row F32 scales, dequantized on load', async () => {
    const dir = join(work, 'int8');
    const q = await buildEmulator({ modelDir: fixture, keep: 2, cut: { bottom: 1, top: 1 }, outDir: dir, quantize: 'int8' });
    assert.equal(q.quantization?.method, 'int8');
    assert.ok(q.fidelity.sizeRatio < manifest.fidelity.sizeRatio / 3);
    const stored = parseSafetensors(await readFile(join(dir, EMULATOR_WEIGHTS_FILE)), EMULATOR_WEIGHTS_FILE);
    const w = stored.tensors.get('model.layers.3.mlp.down_proj.weight');
    assert.equal(w?.dtype, 'I8');
    assert.deepEqual(stored.tensors.get('model.layers.3.mlp.down_proj.weight_scale')?.shape, [64]);
    assert.equal(stored.tensors.get('model.layers.3.input_layernorm.weight')?.dtype, 'F32');
    const bundle = await readBundle(dir);
    const full = await loadModelFolder(fixture);
    const original = full.weights.get('model.layers.3.mlp.down_proj.weight')?.data as Float32Array;
    const loaded = bundle.emulatorWeights.get('model.layers.3.mlp.down_proj.weight')?.data as Float32Array;
    let worst = 0;
    for (let r = 0; r < 64; r++) {
      let max = 0;
      for (let c = 0; c < 172; c++) max = Math.max(max, Math.abs(original[r * 172 + c]));
      for (let c = 0; c < 172; c++) worst = Math.max(worst, Math.abs(original[r * 172 + c] - loaded[r * 172 + c]) / (max / 127));
    }
    assert.ok(worst <= 0.5 + 1e-3, `error at most half a step, got ${worst} steps`);
  });

  it('quantizes a row of zeros to zero scale and values', () => {
    const q = quantizeInt8Rows(new Float32Array([0, 0, 2, -254]), 2, 2);
    assert.deepEqual([...q.scales], [0, 2]);
    assert.deepEqual([...q.values], [0, 0, 1, -127]);
    assert.deepEqual([...dequantizeInt8Rows(q.values, q.scales, 2)], [0, 0, 2, -254]);
  });
});
