// `tandem edge train --middle-lora r=...`: the cloud holds LoRA on the middle blocks and the
// run writes one PEFT folder with the bottom, middle and top parts; a bad spec is exit 2
// naming the flag, before any connection.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { main } from '../../cli/main.ts';
import { parseMiddleLoraFlag } from '../../cli/edge.ts';
import { readSafetensorsFile } from '../../model/index.ts';
import { startTestCloud, tempDir } from '../edge-client/helpers.ts';

const DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');

async function tandem(argv: string[]): Promise<{ code: number; log: string; out: string[] }> {
  const log: string[] = [];
  const out: string[] = [];
  const code = await main(argv, { out: (l) => out.push(l), log: (l) => log.push(l) });
  return { code, log: log.join('\n'), out };
}

describe('tandem edge train --middle-lora', () => {
  it('parses r, alpha and a comma-separated list of targets; refuses the rest naming the flag', async () => {
    assert.deepEqual(parseMiddleLoraFlag('r=8'), { r: 8 });
    assert.deepEqual(parseMiddleLoraFlag('r=8,targets=q_proj,v_proj'), { r: 8, targets: ['q_proj', 'v_proj'] });
    assert.deepEqual(parseMiddleLoraFlag('r=4,alpha=8,targets=q_proj+down_proj'), { r: 4, alpha: 8, targets: ['q_proj', 'down_proj'] });
    assert.deepEqual(parseMiddleLoraFlag('method=ia3'), { method: 'ia3' });
    for (const bad of ['alpha=8', 'r=0', 'r=8,dropout=0.1', 'q_proj,r=8', 'method=vera,r=8']) {
      const r = await tandem(['edge', 'train', '--cloud', 'http://127.0.0.1:9', '--key', 'k', '--model', 'stories260K', '--data', DATA, '--steps', '1', '--middle-lora', bad]);
      assert.equal(r.code, 2, bad);
      assert.match(r.log, /TANDEM_CLI_FLAG_INVALID: --middle-lora/, bad);
    }
  });

  it('trains against a node on loopback and writes one PEFT LoRA folder over the bottom, middle and top blocks', async () => {
    const cloud = await startTestCloud();
    const work = await tempDir('cli-middle');
    try {
      const out = join(work.dir, 'adapter');
      const r = await tandem([
        'edge', 'train', '--cloud', cloud.url, '--key', cloud.key, '--model', 'stories260K', '--data', DATA, '--bottom', '1', '--top', '1',
        '--method', 'lora:r=4,loraAlpha=8,targetModules=q_proj+v_proj', '--middle-lora', 'r=4,alpha=8,targets=q_proj,v_proj',
        '--steps', '2', '--batch-size', '4', '--seq-len', '32', '--out', out, '--progress', 'plain', '--cache', join(work.dir, 'cache'),
      ]);
      assert.equal(r.code, 0, r.log);
      const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
      assert.equal(config.peft_type, 'LORA');
      assert.deepEqual(config.layers_to_transform, [0, 1, 2, 3, 4]);
      const { tensors } = await readSafetensorsFile(join(out, 'adapter_model.safetensors'));
      const layers = new Set([...tensors.keys()].map((k) => Number(/layers\.(\d+)\./.exec(k)?.[1])));
      assert.deepEqual([...layers].sort(), [0, 1, 2, 3, 4]);
      assert.equal(tensors.size, 5 * 2 * 2);
    } finally {
      await cloud.close();
      await work.remove();
    }
  });
});
