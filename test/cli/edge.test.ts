// `tandem edge train` and `tandem demo` check every flag before they work: a bad schedule,
// optimizer or codec is exit 2 with TANDEM_CLI_FLAG_INVALID naming the flag, before any
// connection (the cloud URL here has nothing listening, so work first would fail otherwise).
import assert from 'node:assert/strict';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import { startTestCloud, tempDir } from '../edge-client/helpers.ts';

const DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
const NOWHERE = 'http://127.0.0.1:9';

async function tandem(argv: string[]): Promise<{ code: number; log: string; out: string[] }> {
  const log: string[] = [];
  const out: string[] = [];
  const code = await main(argv, { out: (l) => out.push(l), log: (l) => log.push(l) });
  return { code, log: log.join('\n'), out };
}

describe('the CLI checks before it works', () => {
  const train = ['edge', 'train', '--cloud', NOWHERE, '--key', 'k', '--model', 'stories260K', '--data', DATA, '--steps', '1'];
  const cases: [string, string[]][] = [
    ['--schedule', ['--schedule', 'step']],
    ['--optimizer', ['--optimizer', 'adam']],
    ['--codec-forward', ['--codec-forward', 'int3']],
    ['--codec-backward', ['--codec-backward', 'f8']],
    ['--grad-accum', ['--grad-accum', '0']],
    ['--progress', ['--progress', 'fancy']],
  ];
  for (const [flag, extra] of cases) {
    it(`tandem edge train ${extra.join(' ')}: exit 2, ${flag} named, nothing contacted`, async () => {
      const r = await tandem([...train, ...extra]);
      assert.equal(r.code, 2);
      assert.match(r.log, new RegExp(`TANDEM_CLI_FLAG_INVALID: ${flag}:`));
      assert.doesNotMatch(r.log, /TANDEM_EDGE_/);
    });
  }

  it('tandem edge train takes the recipe flags of tandem train (same names, same defaults)', async () => {
    // With valid flags the first failure is edge-client's own check of the URL: every flag before it passed.
    const flags = ['--grad-accum', '2', '--warmup', '1', '--clip', '0', '--save-every', '1', '--schedule', 'linear', '--optimizer', 'sgd', '--momentum', '0.5'];
    const r = await tandem([...train.map((a) => (a === NOWHERE ? 'ftp://127.0.0.1:9' : a)), ...flags]);
    assert.equal(r.code, 2);
    assert.match(r.log, /TANDEM_EDGE_OPTION_INVALID: the cloud URL must be http\(s\)/);
  });

  it('tandem demo --codec-forward int3: exit 2 before a node starts', async () => {
    const r = await tandem(['demo', '--json', '--codec-forward', 'int3']);
    assert.equal(r.code, 2);
    assert.match(r.log, /TANDEM_CLI_FLAG_INVALID: --codec-forward:/);
  });

  it('tandem edge train against a node on loopback, then tandem edge export of its checkpoint', async () => {
    const cloud = await startTestCloud();
    const work = await tempDir('cli-edge');
    try {
      const checkpoint = join(work.dir, 'ckpt');
      const r = await tandem([
        'edge', 'train', '--cloud', cloud.url, '--key', cloud.key, '--model', 'stories260K', '--data', DATA, '--bottom', '1', '--top', '1',
        '--steps', '2', '--batch-size', '4', '--seq-len', '32', '--lr', '0.01', '--checkpoint', checkpoint, '--cache', join(work.dir, 'cache'), '--progress', 'plain', '--json',
      ]);
      assert.equal(r.code, 0, r.log);
      const summary = JSON.parse(r.out.at(-1) as string) as { steps: number; cut: unknown; before: { loss: number }; after: { loss: number } };
      assert.equal(summary.steps, 2);
      assert.deepEqual(summary.cut, { bottom: 1, top: 1 });
      assert.ok(summary.after.loss < summary.before.loss, `${summary.before.loss} → ${summary.after.loss}`);
      const peft = join(work.dir, 'peft');
      assert.equal((await tandem(['edge', 'export', '--checkpoint', checkpoint, '--out', peft])).code, 0);
      assert.deepEqual((await readdir(peft)).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
    } finally {
      await cloud.close();
      await work.remove();
    }
  });
});
