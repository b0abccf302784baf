// Inputs from flags, files and the cloud are checked before they cost anything, each with a
// typed error naming what was wrong and the limit: --seq-len against the model's positions
// (local and split training), adapter_config.json and a cached config.json that are not JSON,
// and --method values that reach for the prototype or are long enough to be slow.
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { METHOD_FLAG_MAX_CHARS, parseMethodFlag } from '../../cli/edge.ts';
import { main } from '../../cli/main.ts';
import { loadEdgePart, trainEdge, uploadAdapter } from '../../edge-client/index.ts';
import type { EdgePart } from '../../edge-client/download.ts';
import { DEFAULT_RECIPE, checkRecipeFitsModel, trainLocal } from '../../model/index.ts';
import { startTestCloud } from '../edge-client/helpers.ts';
import type { TestCloud } from '../edge-client/helpers.ts';

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');
const NOWHERE = 'http://127.0.0.1:9';
/** max_position_embeddings of the fixture. */
const POSITIONS = 512;

async function tandem(argv: string[]): Promise<{ code: number; log: string }> {
  const log: string[] = [];
  const code = await main(argv, { out: () => {}, log: (l) => log.push(l) });
  return { code, log: log.join('\n') };
}

async function withTemp<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-input-checks-'));
  try {
    return await f(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function hasCode(code: string, ...mentions: string[]): (e: unknown) => boolean {
  return (e: unknown) => {
    const err = e as { code?: unknown; message?: unknown };
    assert.equal(err.code, code, String(err.message));
    for (const m of mentions) assert.ok(String(err.message).includes(m), `${String(err.message)} should mention ${m}`);
    return true;
  };
}

describe('--seq-len must fit the model\'s max_position_embeddings', () => {
  it('checkRecipeFitsModel takes seqLen up to the limit, virtual tokens included, and refuses one more', () => {
    const config = { maxPositionEmbeddings: POSITIONS };
    checkRecipeFitsModel({ seqLen: POSITIONS }, config);
    checkRecipeFitsModel({ seqLen: POSITIONS - 8 }, config, 8);
    assert.throws(() => checkRecipeFitsModel({ seqLen: POSITIONS + 1 }, config), hasCode('TANDEM_TRAIN_OPTION_INVALID', 'seqLen', String(POSITIONS)));
    assert.throws(() => checkRecipeFitsModel({ seqLen: POSITIONS - 7 }, config, 8), hasCode('TANDEM_TRAIN_OPTION_INVALID', '8 virtual tokens', String(POSITIONS)));
  });

  for (const seqLen of [POSITIONS + 1, 100000]) {
    it(`tandem train --seq-len ${seqLen}: exit 2 with TANDEM_TRAIN_OPTION_INVALID naming the limit, nothing written`, async () => {
      await withTemp(async (dir) => {
        const out = join(dir, 'out');
        const r = await tandem(['train', '--model', FIXTURE, '--data', DATA, '--method', 'lora', '--steps', '1', '--batch-size', '1', '--val-fraction', '0', '--seq-len', String(seqLen), '--out', out, '--backend', 'wasm']);
        assert.equal(r.code, 2, r.log);
        assert.match(r.log, /TANDEM_TRAIN_OPTION_INVALID: seqLen .*max_position_embeddings 512/);
        assert.doesNotMatch(r.log, /RangeError|\n\s+at /);
        await assert.rejects(readFile(join(out, 'checkpoint', 'trainer_state.json')), { code: 'ENOENT' });
      });
    });
  }

  it('trainLocal counts prompt tuning\'s virtual tokens: seqLen 508 + 8 virtual tokens is refused', async () => {
    await withTemp(async (dir) => {
      const run = trainLocal({ ...DEFAULT_RECIPE, steps: 1, batchSize: 1, valFraction: 0, seqLen: POSITIONS - 4, modelDir: FIXTURE, dataFile: DATA, outDir: dir, methods: [{ method: 'prompt_tuning', numVirtualTokens: 8 }], evaluate: false, backend: 'wasm' });
      await assert.rejects(run, hasCode('TANDEM_TRAIN_OPTION_INVALID', '8 virtual tokens', String(POSITIONS)));
    });
  });

  describe('split training (trainEdge) gets the same check from model/train', () => {
    let cloud: TestCloud;
    before(async () => {
      cloud = await startTestCloud();
    });
    after(async () => {
      await cloud.close();
    });

    it(`trainEdge with seqLen ${POSITIONS + 1} is refused with TANDEM_TRAIN_OPTION_INVALID before a step`, async () => {
      await withTemp(async (dir) => {
        const steps: unknown[] = [];
        const run = trainEdge({ cloud: cloud.url, key: cloud.key, model: 'stories260K', data: DATA, steps: 1, batchSize: 1, valFraction: 0, seqLen: POSITIONS + 1, evaluate: false, cacheDir: dir, onEvent: (e) => void steps.push(e) });
        await assert.rejects(run, hasCode('TANDEM_TRAIN_OPTION_INVALID', 'seqLen', String(POSITIONS)));
        assert.deepEqual(steps, []);
      });
    });
  });
});

describe('JSON files on the edge are read with typed errors', () => {
  async function offsiteFolder(dir: string, adapterConfig: string | undefined): Promise<string> {
    const folder = join(dir, 'adapter');
    await mkdir(folder);
    await writeFile(join(folder, 'tandem_offsite.json'), JSON.stringify({ format: 'tandem-offsite-adapter', baseModel: { id: 'stories260K', contentHash: 'sha256:00' }, cut: { bottom: 1, top: 1 } }));
    if (adapterConfig !== undefined) await writeFile(join(folder, 'adapter_config.json'), adapterConfig);
    return folder;
  }

  it('uploadAdapter: a truncated adapter_config.json is TANDEM_ADAPTER_INVALID, before the cloud is contacted', async () => {
    await withTemp(async (dir) => {
      const folder = await offsiteFolder(dir, '{"peft_type": "LORA", "r"');
      await assert.rejects(uploadAdapter({ cloudUrl: NOWHERE, key: 'k', adapterDir: folder, dataFile: DATA }), hasCode('TANDEM_ADAPTER_INVALID', 'adapter_config.json'));
    });
  });

  it('uploadAdapter: a missing adapter_config.json is TANDEM_MODEL_FILE_MISSING, not a raw ENOENT', async () => {
    await withTemp(async (dir) => {
      const folder = await offsiteFolder(dir, undefined);
      await assert.rejects(uploadAdapter({ cloudUrl: NOWHERE, key: 'k', adapterDir: folder, dataFile: DATA }), hasCode('TANDEM_MODEL_FILE_MISSING', 'adapter_config.json'));
    });
  });

  it('tandem edge upload with a truncated adapter_config.json: exit 2 with the code, no stack', async () => {
    await withTemp(async (dir) => {
      const folder = await offsiteFolder(dir, '{"peft_type": "LO');
      const r = await tandem(['edge', 'upload', '--cloud', NOWHERE, '--key', 'k', '--adapter', folder, '--data', DATA]);
      assert.equal(r.code, 2, r.log);
      assert.match(r.log, /TANDEM_ADAPTER_INVALID/);
      assert.doesNotMatch(r.log, /SyntaxError|\n\s+at /);
    });
  });

  it('loadEdgePart: a cached config.json that is not JSON is TANDEM_MODEL_CONFIG_INVALID', async () => {
    await withTemp(async (dir) => {
      await writeFile(join(dir, 'config.json'), '<html>502 Bad Gateway</html>');
      const part: EdgePart = { dir, manifest: { model: 'm', contentHash: 'sha256:0', cut: { bottom: 1, top: 1 }, files: [] }, cached: true, downloadedBytes: 0 };
      await assert.rejects(loadEdgePart(part), hasCode('TANDEM_MODEL_CONFIG_INVALID', 'config.json'));
    });
  });
});

describe('--method values are checked', () => {
  for (const key of ['__proto__', 'constructor', 'prototype']) {
    it(`--method 'lora:${key}=...' is TANDEM_CLI_FLAG_INVALID`, () => {
      assert.throws(() => parseMethodFlag(`lora:${key}={"r":3}`), hasCode('TANDEM_CLI_FLAG_INVALID', '--method', key));
    });
  }

  it('a value with __proto__ after a field is refused too; the spec never inherits fields', () => {
    assert.throws(() => parseMethodFlag('lora:r=4,__proto__={"bogusField":1}'), hasCode('TANDEM_CLI_FLAG_INVALID', '__proto__'));
    const s = parseMethodFlag('lora:r=4');
    assert.equal(Object.getPrototypeOf(s), Object.prototype);
    assert.deepEqual(Object.keys(s), ['method', 'r']);
  });

  it('a key given twice, or one named method, is refused', () => {
    assert.throws(() => parseMethodFlag('lora:r=4,r=8'), hasCode('TANDEM_CLI_FLAG_INVALID', 'twice'));
    assert.throws(() => parseMethodFlag('lora:method=ia3'), hasCode('TANDEM_CLI_FLAG_INVALID', 'method'));
  });

  it(`a value over ${METHOD_FLAG_MAX_CHARS} characters is refused at once, naming the limit`, () => {
    const t0 = performance.now();
    assert.throws(() => parseMethodFlag(`lora:${'r=1,'.repeat(16000)}`), hasCode('TANDEM_CLI_FLAG_INVALID', String(METHOD_FLAG_MAX_CHARS)));
    assert.ok(performance.now() - t0 < 100, 'refused without scanning');
  });

  it('splits at commas outside brackets in one pass, as before', () => {
    assert.deepEqual(parseMethodFlag('lora:r=16,loraAlpha=32,targetModules=q_proj+v_proj,layersToTransform=[0,4]'), {
      method: 'lora', r: 16, loraAlpha: 32, targetModules: ['q_proj', 'v_proj'], layersToTransform: [0, 4],
    });
    assert.deepEqual(parseMethodFlag('ia3'), { method: 'ia3' });
    const list = Array.from({ length: 900 }, (_, i) => i).join(',');
    const spec = `lora:layersToTransform=[${list}]`;
    assert.ok(spec.length <= METHOD_FLAG_MAX_CHARS);
    const t0 = performance.now();
    assert.equal((parseMethodFlag(spec).layersToTransform as number[]).length, 900);
    assert.ok(performance.now() - t0 < 100);
    assert.throws(() => parseMethodFlag('lora:layersToTransform=[0,1'), hasCode('TANDEM_CLI_FLAG_INVALID', 'unclosed'));
  });
});
