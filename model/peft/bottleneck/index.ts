// Bottleneck adapters (Houlsby et al. 2019; parallel placement as He et al. 2022) on the attention and MLP sublayers.
import type { PeftMethod } from '../method.ts';
import type { BottleneckConfig } from './config.ts';
import { bottleneckConfigFromJson, bottleneckConfigFromSpec, bottleneckConfigToJson } from './config.ts';
import { BottleneckAdapters, declareBottleneck } from './layer.ts';

export type { BottleneckConfig } from './config.ts';
export { BOTTLENECK_FIELDS } from './config.ts';
export { BOTTLENECK_STATE } from './layer.ts';

export const bottleneck: PeftMethod<BottleneckConfig> = {
  name: 'bottleneck',
  peftType: 'TANDEM_BOTTLENECK',
  fromSpec: bottleneckConfigFromSpec,
  fromJson: bottleneckConfigFromJson,
  toJson: bottleneckConfigToJson,
  declare: declareBottleneck,
  create: (model, config, ctx) => new BottleneckAdapters(model, config, ctx),
};
