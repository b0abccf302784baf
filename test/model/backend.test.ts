import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { activeBackend, initBackend, LlamaModel, llamaConfig, ModelError, parseBackendName, randomWeights, tapedForward, tf } from '../../model/index.ts';

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

describe('tapedForward', () => {
  it('gives the vector-Jacobian product tf.grads gives, after other gradient work ran in between, and frees its tape', async () => {
    await initBackend({ backend: 'wasm' });
    const config = llamaConfig({ hidden: 16, layers: 3, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });
    const model = LlamaModel.fromArrays(config, randomWeights(config, 2, 0.2));
    const h = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 1) as tf.Tensor3D;
    const g = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 2) as tf.Tensor3D;
    model.blocks(h, 0, 3).dispose(); // fills the model's rotary table cache
    const before = tf.memory().numTensors;
    const taped = tapedForward(() => model.blocks(h, 0, 3), [h]);
    assert.ok(taped.savedBytes > 0);
    // Another session's gradient work between this forward and its backward.
    const [other] = tf.grads((x: tf.Tensor) => model.blocks(x as tf.Tensor3D, 1, 2))([g], h);
    other.dispose();
    const [viaTape] = taped.vjp(g);
    const [viaGrads] = tf.grads((x: tf.Tensor) => model.blocks(x as tf.Tensor3D, 0, 3))([h], g);
    assert.deepEqual(Array.from(viaTape.dataSync()), Array.from(viaGrads.dataSync()));
    tf.dispose([viaTape, viaGrads]);
    assert.equal(tf.memory().numTensors, before);
    assert.throws(() => taped.vjp(g), /already used/);
    const unused = tapedForward(() => model.blocks(h, 0, 3), [h]);
    unused.dispose();
    assert.equal(tf.memory().numTensors, before);
    tf.dispose([h, g]);
    model.dispose();
  });
});
