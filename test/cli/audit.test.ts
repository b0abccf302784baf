import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { describe, it } from 'node:test';
import { buildEmulator } from '../../emulator/index.ts';
import { trainOffsite } from '../../edge-client/index.ts';
import { DEFAULT_RECIPE } from '../../model/index.ts';
import { tempDir } from '../cloud-node/helpers.ts';
import { main } from '../../cli/main.ts';
import type { CommandIo } from '../../cli/io.ts';
import type { AuditReport } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const demoData = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');

async function run(argv: string[]): Promise<{ code: number; out: string[]; log: string[] }> {
  const out: string[] = [];
  const log: string[] = [];
  const io: CommandIo = { out: (l) => out.push(l), log: (l) => log.push(l) };
  const code = await main(argv, io);
  return { code, out, log };
}

describe('tandem audit', () => {
  it('reports token recovery and label leakage with and without the defenses', async () => {
    const { code, out, log } = await run(['audit', '--model', fixture, '--data', demoData, '--cut', '1,1', '--defense', 'noise:4:2,max-norm,gradient-noise:4', '--rows', '2', '--label-examples', '64', '--json', '--backend', 'wasm']);
    assert.equal(code, 0, log.join('\n'));
    const report = JSON.parse(out.join('\n')) as AuditReport;
    assert.deepEqual(report.cut, { bottom: 1, top: 1 });
    assert.equal(report.undefended.tokensAttacked, 32);
    assert.ok(report.undefended.tokenRecovery >= 0.9, `undefended recovery ${report.undefended.tokenRecovery}`);
    assert.ok(report.undefended.labelLeakAucDirection !== undefined && report.undefended.labelLeakAucDirection > 0.7);
    const defended = report.defended;
    assert.ok(defended);
    assert.equal(defended.defenses, 'noise:4:2,max-norm,gradient-noise:4');
    assert.ok(defended.tokenRecovery <= report.undefended.tokenRecovery / 2, `defended recovery ${defended.tokenRecovery}`);
    assert.ok(defended.forwardLossCost > 0, 'noise this strong costs loss');
    assert.ok(defended.labelLeakAucNorm !== undefined && defended.labelLeakAucNorm < report.undefended.labelLeakAucDirection);
  });

  it('refuses an unknown defense with a typed error before loading anything', async () => {
    const { code, log } = await run(['audit', '--model', '/nonexistent', '--data', demoData, '--defense', 'noise,shuffle']);
    assert.equal(code, 2);
    assert.match(log.join('\n'), /TANDEM_DEFENSE_UNKNOWN.*shuffle/);
    // tandem edge train checks --defense before it connects anywhere.
    const train = await run(['edge', 'train', '--cloud', 'http://127.0.0.1:9', '--key', 'k', '--model', 'm', '--data', demoData, '--steps', '1', '--defense', 'noise:0.1,shuffle']);
    assert.equal(train.code, 2);
    assert.match(train.log.join('\n'), /TANDEM_DEFENSE_UNKNOWN.*shuffle/);
  });

  it('with --offsite, compares the emulator with the full model and the adapter on the emulator alone with the plug-in', async () => {
    const work = await tempDir();
    const bundleDir = join(work, 'bundle');
    await buildEmulator({ modelDir: fixture, keep: 2, cut: { bottom: 1, top: 1 }, outDir: bundleDir });
    const train = join(work, 'train.txt');
    await writeFile(train, 'The cat sat on the mat. The dog ran to the park.\n'.repeat(8));
    const out = join(work, 'offsite');
    await trainOffsite({ ...DEFAULT_RECIPE, bundleDir, dataFile: train, outDir: out, methods: [{ method: 'block' }], steps: 2, batchSize: 2, seqLen: 16, lr: 0.01, evalEvery: 0, saveEvery: 0, backend: 'wasm' });
    const { code, out: printed, log } = await run(['audit', '--model', fixture, '--data', train, '--cut', '1,1', '--rows', '1', '--offsite', out, '--json', '--backend', 'wasm']);
    assert.equal(code, 0, log.join('\n'));
    const report = JSON.parse(printed.join('\n')) as AuditReport & { offsite: Record<string, { perplexity: number }> };
    for (const k of ['fullZeroShot', 'emulatorZeroShot', 'emulatorFineTuned', 'plugIn']) assert.ok(report.offsite[k].perplexity > 1, k);
    assert.notEqual(report.offsite.emulatorZeroShot.perplexity, report.offsite.fullZeroShot.perplexity, 'the emulator drops a block');
    assert.ok(report.offsite.emulatorFineTuned.perplexity < report.offsite.emulatorZeroShot.perplexity, 'the adapter trained on this text helps the emulator');
    const missing = await run(['audit', '--model', fixture, '--data', train, '--offsite', join(work, 'nothing')]);
    assert.equal(missing.code, 2);
    assert.match(missing.log.join('\n'), /TANDEM_CLI_FLAG_INVALID.*--offsite/);
  });

  it('refuses a cut that leaves no middle', async () => {
    const { code, log } = await run(['audit', '--model', fixture, '--data', demoData, '--cut', '3,2', '--backend', 'wasm']);
    assert.equal(code, 2);
    assert.match(log.join('\n'), /TANDEM_AUDIT_INPUT_INVALID.*cut/);
  });
});
