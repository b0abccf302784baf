// Analytic gradients (tfjs autodiff through our forward) against central finite differences,
// for every parameter kind of a block, the embedding, the final norm and the head.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { tf, useBackend } from '../../model/backend.ts';
import { llamaConfig, randomWeights } from '../../model/init.ts';
import { LlamaModel } from '../../model/llama/llama.ts';
import { causalLmLoss } from '../../model/loss.ts';
import { Rng } from '../../model/random.ts';

const config = llamaConfig({ hidden: 8, layers: 2, heads: 4, kvHeads: 2, intermediate: 12, vocab: 16, attentionBias: true, modelType: 'qwen2' });

for (const backend of ['cpu', 'wasm'] as const) {
  describe(`gradients on ${backend}`, () => {
    it('match finite differences for every parameter', async () => {
      await useBackend(backend);
      const model = LlamaModel.fromArrays(config, randomWeights(config, 7, 0.3));
      const ids = tf.tensor2d([[1, 5, 9, 3, 14, 2, 7], [4, 4, 11, 0, 6, 8, 13]], [2, 7], 'int32');
      const labels = tf.tensor2d([[1, 5, 9, 3, 14, 2, 7], [4, 4, 11, -100, 6, 8, 13]], [2, 7], 'int32');
      const lossOf = (): tf.Scalar => {
        const logits = model.forward(ids);
        const { loss, sum } = causalLmLoss(logits, labels);
        sum.dispose();
        logits.dispose();
        return loss;
      };
      const vars = [...model.weights.values()];
      for (const v of vars) v.trainable = true;
      const { grads, value } = tf.variableGrads(lossOf, vars);
      value.dispose();
      const rng = new Rng(3);
      const kinds = new Set<string>();
      for (const [name, variable] of model.weights) {
        // A random direction d: compare <grad, d> with (L(w + eps d) - L(w - eps d)) / 2 eps.
        const d = Float32Array.from({ length: variable.size }, () => rng.normal());
        const analytic = tf.tidy(() => tf.sum(tf.mul(grads[variable.name], tf.tensor(d, variable.shape))).dataSync()[0]);
        const eps = 1e-2;
        const base = variable.dataSync().slice() as Float32Array;
        const at = (sign: number): number => {
          variable.assign(tf.tensor(base.map((w, i) => w + sign * eps * d[i]), variable.shape));
          const l = lossOf();
          const v = l.dataSync()[0];
          l.dispose();
          return v;
        };
        const numeric = (at(1) - at(-1)) / (2 * eps);
        variable.assign(tf.tensor(base, variable.shape));
        const scale = Math.max(Math.abs(analytic), Math.abs(numeric), 1e-2);
        assert.ok(Math.abs(analytic - numeric) / scale < 2e-2, `${name}: analytic ${analytic} vs numeric ${numeric}`);
        kinds.add(name.replace(/\.\d+\./, '.N.'));
      }
      // Every kind of parameter was checked, the q/k/v biases of Qwen2 included.
      for (const k of ['model.embed_tokens.weight', 'model.layers.N.self_attn.q_proj.bias', 'model.layers.N.self_attn.o_proj.weight', 'model.layers.N.mlp.down_proj.weight', 'model.layers.N.post_attention_layernorm.weight', 'model.norm.weight', 'lm_head.weight']) {
        assert.ok(kinds.has(k), `checked ${k}`);
      }
      tf.dispose(Object.values(grads));
      tf.dispose([ids, labels]);
      model.dispose();
    });
  });
}
