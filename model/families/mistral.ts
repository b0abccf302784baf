import type { ModelFamily } from './family.ts';

/** Mistral: LLaMA's layout; no attention biases. */
export const mistralFamily: ModelFamily = {
  modelType: 'mistral',
  architecture: 'MistralForCausalLM',
  attentionBias: (raw) => Boolean(raw.attention_bias),
};
