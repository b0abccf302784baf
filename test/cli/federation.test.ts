// `tandem federation create|status|export` against a node on loopback: the federation is made
// from a PEFT folder, its status is printed, and the global adapter is written back as a PEFT
// folder that holds the same tensors; bad flags and a refused setting are exit 2 with the code.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { join } from 'node:path';
import { main } from '../../cli/main.ts';
import { readAdapterFolder } from '../../edge-client/index.ts';
import { LlamaModel, createAdapter, initBackend, loadModelFolder, saveAdapter } from '../../model/index.ts';
import { STORIES_DIR, startTestNode, tempDir } from '../cloud-node/helpers.ts';

async function tandem(argv: string[]): Promise<{ code: number; out: string; log: string }> {
  const out: string[] = [];
  const log: string[] = [];
  const code = await main(argv, { out: (l) => out.push(l), log: (l) => log.push(l) });
  return { code, out: out.join('\n'), log: log.join('\n') };
}

describe('tandem federation', () => {
  it('creates a federation from a PEFT folder, prints its status and exports the global adapter', async () => {
    const node = await startTestNode();
    await initBackend({ backend: 'wasm' });
    const loaded = await loadModelFolder(STORIES_DIR);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const adapter = createAdapter(model, [{ method: 'lora', r: 2, targetModules: ['q_proj'] }], { seed: 5 });
    const dir = await tempDir();
    await saveAdapter(adapter, join(dir, 'init'));
    adapter.dispose();
    const common = ['--cloud', node.url, '--key', node.adminKey];
    const created = await tandem(['federation', 'create', ...common, '--id', 'cli', '--model', 'stories260K', '--adapter', join(dir, 'init'), '--owners', 'a,b,c', '--rounds', '2', '--min-owners', '2', '--json']);
    assert.equal(created.code, 0, created.log);
    const status = JSON.parse(created.out) as { id: string; round: number; current: { sampled: string[] } };
    assert.equal(status.round, 1);
    assert.deepEqual(status.current.sampled, ['a', 'b', 'c']);
    const printed = await tandem(['federation', 'status', ...common, '--federation', 'cli']);
    assert.equal(printed.code, 0, printed.log);
    assert.match(printed.out, /federation cli \(stories260K, offsite, fedavg\): open, round 1\/2/);
    const exported = await tandem(['federation', 'export', ...common, '--federation', 'cli', '--out', join(dir, 'out')]);
    assert.equal(exported.code, 0, exported.log);
    assert.deepEqual((await readAdapterFolder(join(dir, 'out'))).tensors, (await readAdapterFolder(join(dir, 'init'))).tensors);
    const dup = await tandem(['federation', 'create', ...common, '--id', 'cli', '--model', 'stories260K', '--adapter', join(dir, 'init'), '--owners', 'a']);
    assert.equal(dup.code, 2);
    assert.match(dup.log, /TANDEM_FED_EXISTS/);
    const bad = await tandem(['federation', 'create', ...common, '--id', 'x', '--model', 'stories260K', '--adapter', join(dir, 'init'), '--owners', 'a,b', '--aggregation', 'mean']);
    assert.equal(bad.code, 2);
    assert.match(bad.log, /TANDEM_CLI_FLAG_INVALID: --aggregation/);
    const timeout = await tandem(['federation', 'create', ...common, '--id', 'y', '--model', 'stories260K', '--adapter', join(dir, 'init'), '--owners', 'a,b', '--deadline', '60', '--owner-timeout', '61']);
    assert.equal(timeout.code, 2);
    assert.match(timeout.log, /TANDEM_CLI_FLAG_INVALID: --owner-timeout: must be at most 60, got 61/);
    const beats = await tandem(['federation', 'create', ...common, '--id', 'z', '--model', 'stories260K', '--adapter', join(dir, 'init'), '--owners', 'a,b', '--deadline', '600', '--owner-timeout', '20', '--json']);
    assert.equal(beats.code, 0, beats.log);
  });
});
