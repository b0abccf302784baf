// VeRA: shared frozen random projections, per-module trainable scaling vectors.
import type { PeftMethod } from '../method.ts';
import type { VeraConfig } from './config.ts';
import { veraConfigFromJson, veraConfigFromSpec, veraConfigToJson } from './config.ts';
import { VeraLayers, declareVera } from './layer.ts';

export type { VeraConfig } from './config.ts';
export { VERA_FIELDS } from './config.ts';
export { VERA_STATE } from './layer.ts';

export const vera: PeftMethod<VeraConfig> = {
  name: 'vera',
  peftType: 'VERA',
  fromSpec: veraConfigFromSpec,
  fromJson: veraConfigFromJson,
  toJson: veraConfigToJson,
  declare: declareVera,
  create: (model, config, ctx) => new VeraLayers(model, config, ctx),
};
