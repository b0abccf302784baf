import type { ModelFamily } from './family.ts';

/** LLaMA (1, 2, 3): q, k and v carry a bias only when `attention_bias` says so. */
export const llamaFamily: ModelFamily = {
  modelType: 'llama',
  architecture: 'LlamaForCausalLM',
  attentionBias: (raw) => Boolean(raw.attention_bias),
};
