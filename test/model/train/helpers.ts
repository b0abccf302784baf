// Small fixtures for training tests: a tiny random model and, until tests use the real
// PEFT methods, hand-built adapters that honour the Adapter contract.
import { tf } from '../../../model/backend.ts';
import type { ForwardHooks } from '../../../model/hooks.ts';
import { llamaConfig, randomWeights } from '../../../model/init.ts';
import { LlamaModel } from '../../../model/llama/llama.ts';
import type { Adapter } from '../../../model/peft/adapter.ts';
import { Rng } from '../../../model/random.ts';

export const tinyConfig = llamaConfig({ hidden: 16, layers: 3, heads: 4, kvHeads: 2, intermediate: 24, vocab: 32 });

export function tinyModel(seed = 1): LlamaModel {
  return LlamaModel.fromArrays(tinyConfig, randomWeights(tinyConfig, seed, 0.2));
}

/** LoRA-like: y += x Aᵀ Bᵀ on q_proj and v_proj of every layer; B starts non-zero so every part gets gradients. */
export function testLora(model: LlamaModel, seed = 5, r = 2): Adapter {
  const rng = new Rng(seed);
  const vars = new Map<string, tf.Variable>();
  const rand = (shape: number[]) => tf.tidy(() => tf.variable(tf.tensor(Float32Array.from({ length: shape[0] * shape[1] }, () => rng.normal() * 0.1), shape), true));
  const d = model.config.hiddenSize;
  for (let l = 0; l < model.numLayers; l++) {
    for (const m of ['q_proj', 'v_proj']) {
      const out = m === 'q_proj' ? model.config.numAttentionHeads * model.config.headDim : model.config.numKeyValueHeads * model.config.headDim;
      vars.set(`base_model.model.model.layers.${l}.self_attn.${m}.lora_A.weight`, rand([r, d]));
      vars.set(`base_model.model.model.layers.${l}.self_attn.${m}.lora_B.weight`, rand([out, r]));
    }
  }
  const hooks: ForwardHooks = {
    linear(module, x, base) {
      const a = vars.get(`base_model.model.${module.path}.lora_A.weight`);
      const b = vars.get(`base_model.model.${module.path}.lora_B.weight`);
      if (!a || !b) return base(x);
      return tf.add(base(x), tf.matMul(tf.matMul(x, a, false, true), b, false, true)) as tf.Tensor2D;
    },
  };
  return plainAdapter(hooks, vars, 0);
}

/** Prompt-tuning-like: `n` virtual token embeddings prepended to every sequence. */
export function testPrompt(model: LlamaModel, n = 2, seed = 6): Adapter {
  const rng = new Rng(seed);
  const d = model.config.hiddenSize;
  const prompt = tf.tidy(() => tf.variable(tf.tensor(Float32Array.from({ length: n * d }, () => rng.normal() * 0.1), [n, d]), true));
  const vars = new Map([['prompt_embeddings', prompt]]);
  const hooks: ForwardHooks = {
    embeddings(h) {
      const [b] = h.shape;
      return tf.concat([tf.tile(tf.expandDims(prompt, 0), [b, 1, 1]), h], 1) as tf.Tensor3D;
    },
  };
  return plainAdapter(hooks, vars, n);
}

function plainAdapter(hooks: ForwardHooks, vars: Map<string, tf.Variable>, numVirtualTokens: number): Adapter {
  return {
    hooks,
    numVirtualTokens,
    trainableVariables: () => vars,
    merge() {
      throw new Error('not mergeable');
    },
    unmerge() {},
    merged: false,
    dispose() {
      for (const v of vars.values()) v.dispose();
    },
  };
}

/** The adapter's values by name, for bit-for-bit comparisons. */
export function snapshot(adapter: Adapter): Map<string, Float32Array> {
  return new Map([...adapter.trainableVariables()].map(([n, v]) => [n, Float32Array.from(v.dataSync() as Float32Array)]));
}

export function maxAbsDiff(a: Map<string, Float32Array>, b: Map<string, Float32Array>): number {
  let m = 0;
  for (const [n, x] of a) {
    const y = b.get(n);
    if (!y) return Infinity;
    for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i] - y[i]));
  }
  return m;
}

/** Deterministic pseudo-text batches: rows of ids in [3, vocab), labels equal to ids. */
export function randomBatch(seed: number, rows: number, seq: number, vocab = tinyConfig.vocabSize): { ids: number[][]; labels: number[][] } {
  const rng = new Rng(seed);
  const ids = Array.from({ length: rows }, () => Array.from({ length: seq }, () => 3 + rng.int(vocab - 3)));
  return { ids, labels: ids.map((r) => [...r]) };
}
