// Prompt tuning: trainable virtual-token embeddings prepended to every sequence.
import type { PeftMethod } from '../method.ts';
import type { PromptTuningConfig } from './config.ts';
import { promptTuningConfigFromJson, promptTuningConfigFromSpec, promptTuningConfigToJson } from './config.ts';
import { PromptTuning, declarePromptTuning } from './layer.ts';

export type { PromptTuningConfig } from './config.ts';
export { PROMPT_TUNING_FIELDS } from './config.ts';
export { PROMPT_TUNING_STATE } from './layer.ts';

export const promptTuning: PeftMethod<PromptTuningConfig> = {
  name: 'prompt_tuning',
  peftType: 'PROMPT_TUNING',
  fromSpec: promptTuningConfigFromSpec,
  fromJson: promptTuningConfigFromJson,
  toJson: promptTuningConfigToJson,
  declare: declarePromptTuning,
  create: (model, config, ctx) => new PromptTuning(model, config, ctx),
  virtualTokens: (config) => config.numVirtualTokens,
};
