// BitFit: the model's own biases become trainable.
import type { PeftMethod } from '../method.ts';
import type { BitfitConfig } from './config.ts';
import { bitfitConfigFromJson, bitfitConfigFromSpec, bitfitConfigToJson } from './config.ts';
import { bitfitWeights, declareBitfit } from './layer.ts';

export type { BitfitConfig } from './config.ts';

export const bitfit: PeftMethod<BitfitConfig> = {
  name: 'bitfit',
  peftType: 'TANDEM_BITFIT',
  fromSpec: bitfitConfigFromSpec,
  fromJson: bitfitConfigFromJson,
  toJson: bitfitConfigToJson,
  declare: declareBitfit,
  create: (model, config) => bitfitWeights(model, config),
};
