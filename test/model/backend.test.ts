import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { activeBackend, initBackend, ModelError, parseBackendName, tf } from '../../model/index.ts';

describe('backend choice', () => {
  it('takes the backend asked for and reports it', async () => {
    const logs: string[] = [];
    const choice = await initBackend({ backend: 'cpu', log: (l) => logs.push(l) });
    assert.equal(choice.name, 'cpu');
    assert.equal(tf.getBackend(), 'cpu');
    assert.equal(activeBackend()?.name, 'cpu');
    assert.deepEqual(logs, ['backend: cpu']);
    assert.equal((await initBackend({ backend: 'wasm' })).name, 'wasm');
    assert.equal(tf.getBackend(), 'wasm');
  });

  it('accepts aliases and refuses unknown names with a typed error naming the flag', () => {
    assert.equal(parseBackendName('node'), 'tensorflow');
    assert.equal(parseBackendName('auto'), undefined);
    assert.throws(() => parseBackendName('tpu', 'TANDEM_BACKEND'), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_BACKEND_UNAVAILABLE' && /TANDEM_BACKEND/.test(e.message));
  });

  it('names the reason when an asked-for native backend is not installed', async () => {
    let nativeLoads = true;
    try {
      await import('@tensorflow/tfjs-node' as string);
    } catch {
      nativeLoads = false;
    }
    if (nativeLoads) return; // a machine with libtensorflow: nothing to refuse
    await assert.rejects(initBackend({ backend: 'tensorflow' }), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_BACKEND_UNAVAILABLE' && /tensorflow:/.test(e.message));
  });
});
