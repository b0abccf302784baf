import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { activeBackend, gradients, initBackend, LlamaModel, ModelError, parseBackendName, tapedForward, tf } from '../../model/index.ts';
import { llamaConfig, randomWeights } from '../../model/testing.ts';

describe('backend choice', () => {
  it('takes the backend asked for and reports it', async () => {
    const logs: string[] = [];
    const choice = await initBackend({ backend: 'cpu', log: (l) => logs.push(l) });
    assert.equal(choice.name, 'cpu');
    assert.equal(tf.getBackend(), 'cpu');
    assert.equal(activeBackend()?.name, 'cpu');
    assert.deepEqual(logs, ['backend: cpu']);
    // Two callers at once (two nodes started together) while the wasm module first loads.
    const both = await Promise.all([initBackend({ backend: 'wasm' }), initBackend({ backend: 'wasm' })]);
    assert.deepEqual(both.map((c) => c.name), ['wasm', 'wasm']);
    assert.equal(tf.getBackend(), 'wasm');
  });

  it('accepts aliases and refuses unknown names with a typed error naming the flag', () => {
    assert.equal(parseBackendName('node'), 'tensorflow');
    assert.equal(parseBackendName('auto'), undefined);
    assert.throws(() => parseBackendName('tpu', 'TANDEM_BACKEND'), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_BACKEND_UNAVAILABLE' && /TANDEM_BACKEND/.test(e.message));
  });

  it('names the reason when an asked-for native backend is not installed', async (t) => {
    let nativeLoads = true;
    try {
      await import('@tensorflow/tfjs-node' as string);
    } catch {
      nativeLoads = false;
    }
    if (nativeLoads) {
      t.skip('@tensorflow/tfjs-node loads on this machine: there is no missing native backend to refuse');
      return;
    }
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

describe('gradients', () => {
  it('equals tf.variableGrads, gives undefined for what the value does not depend on, and leaves no tensor behind', async () => {
    await initBackend({ backend: 'wasm' });
    const config = llamaConfig({ hidden: 16, layers: 2, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });
    const model = LlamaModel.fromArrays(config, randomWeights(config, 3, 0.2));
    const vars = [...model.weights.values()];
    for (const v of vars) v.trainable = true;
    const ids = tf.tensor2d([[1, 4, 9, 2, 7]], [1, 5], 'int32');
    const unused = tf.variable(tf.zeros([3]), true);
    const loss = (): tf.Scalar => tf.sum(model.forward(ids)) as tf.Scalar;
    model.forward(ids).dispose(); // fills the rotary table cache
    const before = tf.memory().numTensors;
    const ours = gradients(loss, [...vars, unused]);
    const theirs = tf.variableGrads(loss, vars);
    assert.equal(ours.grads.at(-1), undefined);
    vars.forEach((v, i) => assert.deepEqual(Array.from((ours.grads[i] as tf.Tensor).dataSync()), Array.from(theirs.grads[v.name].dataSync()), v.name));
    assert.equal(ours.value.dataSync()[0], theirs.value.dataSync()[0]);
    tf.dispose([ours.value, ...ours.grads.filter((g): g is tf.Tensor => g !== undefined), theirs.value, ...Object.values(theirs.grads)]);
    assert.equal(tf.memory().numTensors, before);
    tf.dispose([ids, unused]);
    model.dispose();
  });

  it("with an upstream gradient equals tf.grads bit for bit (the cloud's recompute of g_B from h_B)", async () => {
    for (const backend of ['cpu', 'wasm']) {
      await initBackend({ backend });
      const config = llamaConfig({ hidden: 16, layers: 5, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });
      const model = LlamaModel.fromArrays(config, randomWeights(config, 3, 0.2));
      const h = tf.randomNormal([2, 7, 16], 0, 1, 'float32', 4) as tf.Tensor3D;
      const g = tf.randomNormal([2, 7, 16], 0, 1, 'float32', 5) as tf.Tensor3D;
      const [theirs] = tf.grads((x: tf.Tensor) => model.blocks(x as tf.Tensor3D, 1, 4))([h], g);
      const ours = gradients(() => model.blocks(h, 1, 4), [h], g);
      assert.deepEqual(Array.from((ours.grads[0] as tf.Tensor).dataSync()), Array.from(theirs.dataSync()), backend);
      tf.dispose([h, g, theirs, ours.value, ours.grads[0] as tf.Tensor]);
      model.dispose();
    }
  });
});
