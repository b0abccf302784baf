import type { ModelFamily } from './family.ts';

/** Qwen2: LLaMA's layout with q, k and v biases always (transformers' Qwen2Attention has bias=True). */
export const qwen2Family: ModelFamily = {
  modelType: 'qwen2',
  architecture: 'Qwen2ForCausalLM',
  attentionBias: () => true,
};
