// `tandem edge train` and `tandem demo` check every flag before they work: a bad schedule,
// optimizer or codec is exit 2 with TANDEM_CLI_FLAG_INVALID naming the flag, before any
// connection (the cloud URL here has nothing listening, so work first would fail otherwise).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';

const DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
const NOWHERE = 'http://127.0.0.1:9';

async function tandem(argv: string[]): Promise<{ code: number; log: string }> {
  const log: string[] = [];
  const code = await main(argv, { out: () => undefined, log: (l) => log.push(l) });
  return { code, log: log.join('\n') };
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
    // With valid flags the first failure is the connection: everything before it was checked.
    const r = await tandem([...train, '--grad-accum', '2', '--warmup', '1', '--clip', '0', '--save-every', '1', '--schedule', 'linear']);
    assert.equal(r.code, 2);
    assert.match(r.log, /TANDEM_EDGE_CONNECT_FAILED/);
  });

  it('tandem demo --codec-forward int3: exit 2 before a node starts', async () => {
    const r = await tandem(['demo', '--json', '--codec-forward', 'int3']);
    assert.equal(r.code, 2);
    assert.match(r.log, /TANDEM_CLI_FLAG_INVALID: --codec-forward:/);
  });
});
