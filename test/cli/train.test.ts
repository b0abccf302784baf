// tandem train, eval and export in-process on the stories260K fixture. main.ts registers
// the commands; these tests run each command's own parser and action.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import type { Command } from 'commander';
import { CliError } from '../../cli/errors.ts';
import { evalCommand } from '../../cli/eval.ts';
import { exportCommand } from '../../cli/export.ts';
import type { CommandIo } from '../../cli/io.ts';
import { trainCommand } from '../../cli/train.ts';
import { ModelError } from '../../model/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
let work = '';
after(() => rm(work, { recursive: true, force: true }));

async function run(make: (io: CommandIo) => Command, argv: string[]): Promise<string[]> {
  const out: string[] = [];
  const io: CommandIo = { out: (l) => out.push(l), log: () => undefined };
  const command = make(io).exitOverride().configureOutput({ writeOut: (s) => out.push(s), writeErr: () => undefined });
  await command.parseAsync(argv, { from: 'user' });
  return out;
}

describe('tandem train, eval, export', () => {
  it('trains a LoRA adapter, evaluates it with label accuracy and exports it as PEFT and merged folders', async () => {
    work = await mkdtemp(join(tmpdir(), 'tandem-cli-train-'));
    const data = join(work, 'labels.jsonl');
    const records = Array.from({ length: 12 }, (_, i) => JSON.stringify(i % 2 ? { text: 'The dog was sad and cried.', label: 'sad' } : { text: 'Lily smiled and played.', label: 'happy' }));
    await writeFile(data, `${records.join('\n')}\n`);
    const out = join(work, 'run');
    const base = ['--model', fixture, '--data', data, '--method', 'lora', '--r', '2', '--target-modules', 'q_proj,v_proj', '--out', out, '--batch-size', '4', '--seq-len', '16', '--lr', '0.01', '--backend', 'wasm'];
    const lines = await run(trainCommand, [...base, '--steps', '3', '--eval-every', '3', '--json']);
    const events = lines.map((l) => JSON.parse(l) as { type: string; step: number; accuracy?: number });
    assert.deepEqual(
      events.map((e) => e.type),
      ['start', 'eval', 'step', 'step', 'step', 'eval', 'checkpoint', 'done'],
    );
    assert.ok(typeof events.at(-3)?.accuracy === 'number');
    const adapter = join(out, 'adapter');
    assert.ok((await stat(join(adapter, 'adapter_config.json'))).isFile());

    // Plain lines when not on a terminal, and --resume of a finished run does nothing more.
    const resumed = await run(trainCommand, [...base, '--steps', '3', '--resume']);
    assert.ok(resumed[0].startsWith('resuming at step 3/3'), resumed[0]);

    const report = JSON.parse((await run(evalCommand, ['--model', fixture, '--adapter', adapter, '--data', data, '--seq-len', '16', '--json', '--backend', 'wasm']))[0]) as { loss: number; perplexity: number; accuracy: number; examples: number };
    assert.equal(report.examples, 12);
    assert.ok(report.loss > 0 && Math.abs(report.perplexity - Math.exp(report.loss)) < 1e-9);
    assert.ok(report.accuracy >= 0 && report.accuracy <= 1);

    const peft = join(work, 'peft');
    await run(exportCommand, ['--model', fixture, '--adapter', adapter, '--out', peft, '--backend', 'wasm']);
    assert.deepEqual(await readFile(join(peft, 'adapter_model.safetensors')), await readFile(join(adapter, 'adapter_model.safetensors')));
    const merged = join(work, 'merged');
    await run(exportCommand, ['--model', fixture, '--adapter', adapter, '--out', merged, '--merged', '--backend', 'wasm']);
    // The merged model scores the data as the base model with the adapter does.
    const mergedReport = JSON.parse((await run(evalCommand, ['--model', merged, '--data', data, '--seq-len', '16', '--json', '--backend', 'wasm']))[0]) as { loss: number };
    assert.ok(Math.abs(mergedReport.loss - report.loss) < 1e-4, `${mergedReport.loss} vs ${report.loss}`);
  });

  it('refuses bad flags with a stable code naming the flag', async () => {
    const cases: [string[], string, string][] = [
      [['--data', 'x.jsonl', '--method', 'lora', '--steps', '1', '--out', 'o'], 'TANDEM_CLI_FLAG_MISSING', '--model'],
      [['--model', fixture, '--data', 'x.jsonl', '--method', 'lora', '--steps', 'ten', '--out', 'o'], 'TANDEM_CLI_FLAG_INVALID', '--steps'],
      [['--model', fixture, '--data', 'x.jsonl', '--method', 'lora', '--steps', '1', '--out', 'o', '--schedule', 'step'], 'TANDEM_CLI_FLAG_INVALID', '--schedule'],
      [['--model', fixture, '--data', 'x.jsonl', '--method', 'lora', '--steps', '1', '--out', 'o', '--cut', '1'], 'TANDEM_CLI_FLAG_INVALID', '--cut'],
    ];
    for (const [argv, code, flag] of cases) {
      await assert.rejects(run(trainCommand, argv), (e: unknown) => e instanceof CliError && e.code === code && e.message.includes(flag), argv.join(' '));
    }
    // A malformed data line is the model's typed error, naming the file and line.
    const bad = join(work, 'bad.jsonl');
    await writeFile(bad, '{"text":"fine"}\n{"text":\n');
    await assert.rejects(run(evalCommand, ['--model', fixture, '--data', bad, '--backend', 'wasm']), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_DATA_INVALID' && e.message.includes('line 2') && e.message.includes(bad));
  });

  it('trains and evaluates on ONNX Runtime (the default engine) to the losses tfjs gives, and says so at start', async () => {
    const data = join(work, 'stories.jsonl');
    const texts = ['Once upon a time there was a little girl.', 'The sun was warm and the dog ran fast.', 'Tom liked his red ball very much.', 'She went to the park with her mom.'];
    await writeFile(data, `${Array.from({ length: 16 }, (_, i) => JSON.stringify({ text: texts[i % 4] })).join('\n')}\n`);
    const common = ['--model', fixture, '--data', data, '--method', 'lora', '--r', '2', '--target-modules', 'q_proj,v_proj,down_proj', '--batch-size', '4', '--seq-len', '16', '--lr', '0.01', '--steps', '3', '--json'];
    const steps = (lines: string[]) => lines.map((l) => JSON.parse(l) as { type: string; loss?: number; engine?: string });
    const tfjs = steps(await run(trainCommand, [...common, '--out', join(work, 'tfjs'), '--backend', 'wasm']));
    const ort = steps(await run(trainCommand, [...common, '--out', join(work, 'ort')]));
    assert.match(ort[0].engine ?? '', /^ort-(cpu|cuda): LoRA r2/);
    assert.match(tfjs[0].engine ?? '', /^tfjs wasm/);
    const losses = (events: typeof ort) => events.filter((e) => e.type === 'step' || e.type === 'eval').map((e) => e.loss as number);
    losses(tfjs).forEach((l, i) => assert.ok(Math.abs(l - losses(ort)[i]) < 1e-4, `loss ${i}: ${l} vs ${losses(ort)[i]}`));
    const evalArgs = ['--model', fixture, '--adapter', join(work, 'ort', 'adapter'), '--data', data, '--seq-len', '16', '--json'];
    const onTfjs = JSON.parse((await run(evalCommand, [...evalArgs, '--backend', 'wasm']))[0]) as { loss: number };
    const onOrt = JSON.parse((await run(evalCommand, [...evalArgs, '--engine', 'ort-cpu']))[0]) as { loss: number };
    assert.ok(Math.abs(onTfjs.loss - onOrt.loss) < 1e-4, `${onTfjs.loss} vs ${onOrt.loss}`);
  });

  it('prints help for each command', async () => {
    for (const make of [trainCommand, evalCommand, exportCommand]) {
      const out: string[] = [];
      const command = make({ out: () => undefined, log: () => undefined }).exitOverride().configureOutput({ writeOut: (s) => out.push(s) });
      await assert.rejects(command.parseAsync(['--help'], { from: 'user' }), (e: unknown) => (e as { code?: string }).code === 'commander.helpDisplayed');
      assert.ok(out.join('').includes('--model'), out.join(''));
    }
  });
});
