// Whole trainable blocks: the Offsite-Tuning adapter.
import type { PeftMethod } from '../method.ts';
import type { BlockConfig } from './config.ts';
import { blockConfigFromJson, blockConfigFromSpec, blockConfigToJson } from './config.ts';
import { blockWeights, declareBlock } from './layer.ts';

export type { BlockConfig } from './config.ts';

export const block: PeftMethod<BlockConfig> = {
  name: 'block',
  peftType: 'TANDEM_BLOCK',
  fromSpec: blockConfigFromSpec,
  fromJson: blockConfigFromJson,
  toJson: blockConfigToJson,
  declare: declareBlock,
  create: (model, config) => blockWeights(model, config),
};
