// tandem emulate, tandem edge offsite and tandem edge upload, in-process on stories260K.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import type { Command } from 'commander';
import { emulateCommand } from '../../cli/emulate.ts';
import type { CommandIo } from '../../cli/io.ts';
import { offsiteCommand, uploadCommand } from '../../cli/offsite.ts';
import { EmulatorError } from '../../emulator/index.ts';
import { createTenantKey, startTestNode, tempDir } from '../cloud-node/helpers.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');

async function run(make: (io: CommandIo) => Command, argv: string[]): Promise<string[]> {
  const out: string[] = [];
  const io: CommandIo = { out: (l) => out.push(l), log: () => undefined };
  await make(io).exitOverride().configureOutput({ writeOut: (s) => out.push(s), writeErr: () => undefined }).parseAsync(argv, { from: 'user' });
  return out;
}

describe('tandem emulate, edge offsite, edge upload', () => {
  it('builds a bundle with a fidelity report, trains against it offline, and gets the plug-in evaluation from the cloud', async () => {
    const work = await tempDir();
    const text = join(work, 'text.txt');
    await writeFile(text, 'Lily and Tom went to the park. They played on the swings and laughed all day.\n'.repeat(10));
    const bundle = join(work, 'bundle');
    const report = await run(emulateCommand, ['--model', fixture, '--keep', '2', '--cut', '1,1', '--distill', text, '--steps', '2', '--batch-size', '2', '--seq-len', '16', '--quantize', 'int8', '--out', bundle, '--backend', 'wasm']);
    assert.match(report.join('\n'), /keeps middle blocks 1, 3 of \[1, 4\)/);
    assert.match(report.join('\n'), /perplexity\s+full model [\d.]+, emulated model [\d.]+/);
    assert.match(report.join('\n'), /middle cosine\s+0\.\d+/);
    assert.match(report.join('\n'), /2 steps on text\.txt, λ 30/);
    const manifest = JSON.parse(await readFile(join(bundle, 'manifest.json'), 'utf8')) as { fidelity: { emulatorPerplexity: number }; distillation: { steps: number } };
    assert.equal(manifest.distillation.steps, 2);
    assert.ok(manifest.fidelity.emulatorPerplexity > 1);

    const out = join(work, 'offsite');
    const lines = await run(offsiteCommand, ['--bundle', bundle, '--data', text, '--method', 'lora', '--r', '2', '--steps', '2', '--batch-size', '2', '--seq-len', '16', '--out', out, '--backend', 'wasm', '--json']);
    const last = JSON.parse(lines.at(-1) as string) as { type: string; adapterDir: string; emulatorFineTuned: { perplexity: number } };
    assert.equal(last.type, 'offsite');
    assert.ok(last.emulatorFineTuned.perplexity > 1);

    const node = await startTestNode({ backend: 'wasm' });
    const key = await createTenantKey(node, 'bob');
    const printed = await run(uploadCommand, ['--cloud', node.url, '--key', key, '--adapter', last.adapterDir, '--data', text, '--seq-len', '16']);
    assert.match(printed[0], /^plug-in evaluation on stories260K \(1 examples, \d+ tokens\)/);
    assert.match(printed[2], /with the adapter\s+loss [\d.]+\s+ppl [\d.]+/);
  });

  it('refuses to train on a bundle with a changed byte', async () => {
    const work = await tempDir();
    const bundle = join(work, 'bundle');
    await run(emulateCommand, ['--model', fixture, '--keep', '2', '--cut', '1,1', '--out', bundle, '--backend', 'wasm']);
    const file = join(bundle, 'tokenizer.json');
    const bytes = await readFile(file);
    bytes[10] ^= 0x20;
    await writeFile(file, bytes);
    const text = join(work, 'text.txt');
    await writeFile(text, 'Once upon a time there was a cat.\n'.repeat(4));
    await assert.rejects(
      run(offsiteCommand, ['--bundle', bundle, '--data', text, '--steps', '1', '--out', join(work, 'o'), '--backend', 'wasm']),
      (e: unknown) => e instanceof EmulatorError && e.code === 'TANDEM_BUNDLE_CHECKSUM_MISMATCH' && /tokenizer\.json/.test(e.message),
    );
  });
});
