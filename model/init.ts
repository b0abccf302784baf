import type { ModelConfig } from './config.ts';
import { expectedTensorShapes, parseModelConfig } from './config.ts';
import { Rng } from './random.ts';

/**
 * Random weights for a configuration (normal, std 0.02 like HF's initializer_range; norms at 1),
 * for tests and benchmarks of model shapes we do not ship.
 */
export function randomWeights(config: ModelConfig, seed = 0, std = 0.02): Map<string, { shape: number[]; data: Float32Array }> {
  const rng = new Rng(seed);
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, shape] of expectedTensorShapes(config)) {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (name.endsWith('norm.weight')) data.fill(1);
    else for (let i = 0; i < data.length; i++) data[i] = rng.normal() * std;
    out.set(name, { shape, data });
  }
  return out;
}

/** A LLaMA configuration from a few numbers, in config.json's own keys. */
export function llamaConfig(fields: {
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  intermediate: number;
  vocab: number;
  maxPositions?: number;
  modelType?: 'llama' | 'mistral' | 'qwen2';
  tie?: boolean;
  attentionBias?: boolean;
}): ModelConfig {
  return parseModelConfig({
    architectures: ['LlamaForCausalLM'],
    model_type: fields.modelType ?? 'llama',
    hidden_size: fields.hidden,
    num_hidden_layers: fields.layers,
    num_attention_heads: fields.heads,
    num_key_value_heads: fields.kvHeads,
    intermediate_size: fields.intermediate,
    vocab_size: fields.vocab,
    max_position_embeddings: fields.maxPositions ?? 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    hidden_act: 'silu',
    tie_word_embeddings: fields.tie ?? false,
    attention_bias: fields.attentionBias ?? false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'float32',
  });
}

/** SmolLM-135M's shape, the larger model of the benchmarks. */
export const SMOLLM_135M_SHAPE = { hidden: 576, layers: 30, heads: 9, kvHeads: 3, intermediate: 1536, vocab: 49152, tie: true, maxPositions: 2048 } as const;
