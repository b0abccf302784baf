// Emulator distillation and fidelity with the frozen work on ONNX Runtime give tfjs's figures.
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { buildEmulator } from '../../emulator/index.ts';
import type { BundleManifest } from '../../emulator/index.ts';
import { initBackend } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const text = 'Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. One day the sun was hot and they sat under a big tree.\n';
let work = '';

before(async () => {
  await initBackend({ backend: 'wasm' });
  work = await mkdtemp(join(tmpdir(), 'tandem-emulator-engine-'));
  await writeFile(join(work, 'public.txt'), text.repeat(12));
});
after(() => rm(work, { recursive: true, force: true }));

describe('emulator on the ONNX Runtime engine', () => {
  it('distills to the losses and reports the fidelity tfjs gives, logging the engine', async () => {
    const build = (engine: string | undefined, out: string, log?: (l: string) => void): Promise<BundleManifest> => buildEmulator({
      modelDir: fixture, keep: 2, cut: { bottom: 1, top: 1 }, outDir: join(work, out), seqLen: 32, evalRows: 4,
      distill: { dataFile: join(work, 'public.txt'), steps: 3, batchSize: 2, seqLen: 32 },
      ...(engine ? { engine } : {}), log,
    });
    const lines: string[] = [];
    const tfjs = await build(process.env.TANDEM_ENGINE ? 'cpu' : undefined, 'tfjs');
    const ort = await build('ort-cpu', 'ort', (l) => lines.push(l));
    assert.match(lines.join('\n'), /^engine: ort-cpu/m);
    const a = tfjs.distillation;
    const b = ort.distillation;
    assert.ok(a && b);
    for (const k of ['finalLoss', 'finalLmLoss', 'finalKdLoss'] as const) assert.ok(Math.abs(a[k] - b[k]) < 1e-4 * Math.max(1, Math.abs(a[k])), `${k}: ${a[k]} vs ${b[k]}`);
    for (const k of ['fullPerplexity', 'emulatorPerplexity', 'middleCosine'] as const) {
      const x = tfjs.fidelity[k] as number;
      const y = ort.fidelity[k] as number;
      assert.ok(Number.isFinite(x) && Math.abs(x - y) < 1e-4 * Math.max(1, Math.abs(x)), `${k}: ${x} vs ${y}`);
    }
    assert.equal(ort.fidelity.tokens, tfjs.fidelity.tokens);
  });
});
