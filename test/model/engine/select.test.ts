import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { describe, it } from 'node:test';
import { ENGINES, parseEngineName, selectEngine } from '../../../model/engine/index.ts';
import { rejectsModelError, throwsModelError } from '../helpers.ts';

describe('engine selection', () => {
  it('lists the engines best first', () => {
    assert.deepEqual([...ENGINES], ['ort-cuda', 'tfjs-node-gpu', 'ort-cpu', 'tfjs-node', 'wasm', 'cpu']);
  });

  it('picks the best engine that starts, logs the choice and what it skipped, with one thread per core', async () => {
    const saved = process.env.TANDEM_ENGINE;
    delete process.env.TANDEM_ENGINE;
    try {
      const logs: string[] = [];
      const choice = await selectEngine({ log: (l) => logs.push(l) });
      // Whatever this machine has, the choice is the first entry of ENGINES not skipped.
      assert.equal(ENGINES.indexOf(choice.name), choice.skipped.length);
      assert.deepEqual(choice.skipped.map((s) => s.name), ENGINES.slice(0, choice.skipped.length));
      assert.ok(choice.skipped.every((s) => s.reason.length > 0));
      assert.equal(choice.threads, availableParallelism());
      assert.equal(logs.length, 1);
      assert.match(logs[0], new RegExp(`^engine: ${choice.name}`));
      // onnxruntime-node's CPU library ships inside the npm package: ORT CPU is always there.
      assert.ok(ENGINES.indexOf(choice.name) <= ENGINES.indexOf('ort-cpu'));
    } finally {
      if (saved !== undefined) process.env.TANDEM_ENGINE = saved;
    }
  });

  it('takes --engine over TANDEM_ENGINE, and TANDEM_ENGINE over the automatic choice', async () => {
    const saved = process.env.TANDEM_ENGINE;
    process.env.TANDEM_ENGINE = 'wasm';
    try {
      const env = await selectEngine({});
      assert.equal(env.name, 'wasm');
      assert.equal(env.tfjsBackend, 'wasm');
      const flag = await selectEngine({ engine: 'ort-cpu', threads: 1 });
      assert.equal(flag.name, 'ort-cpu');
      assert.equal(flag.ortProvider, 'cpu');
      assert.equal(flag.threads, 1);
    } finally {
      if (saved === undefined) delete process.env.TANDEM_ENGINE;
      else process.env.TANDEM_ENGINE = saved;
    }
  });

  it('refuses unknown engine names and bad thread counts with typed errors naming the field', async () => {
    throwsModelError(() => parseEngineName('gpu-please'), 'TANDEM_BACKEND_UNAVAILABLE', '--engine', 'ort-cpu');
    await rejectsModelError(selectEngine({ engine: 'ort-cpu', threads: 0 }), 'TANDEM_INPUT_INVALID', '--threads');
    await rejectsModelError(selectEngine({ engine: 'ort-cpu', threads: '2x' }), 'TANDEM_INPUT_INVALID', '--threads');
  });

  it('fails with a typed error when the engine asked for cannot start', async (t) => {
    const probe = await selectEngine({ engine: 'ort-cpu' });
    assert.equal(probe.name, 'ort-cpu');
    try {
      await selectEngine({ engine: 'ort-cuda' });
      t.skip('this machine has the CUDA provider');
    } catch (err) {
      await rejectsModelError(Promise.reject(err), 'TANDEM_BACKEND_UNAVAILABLE', 'ort-cuda');
    }
  });
});
