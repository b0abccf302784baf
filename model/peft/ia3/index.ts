// (IA)^3: learned vectors that rescale the k and v outputs and the input of the FFN's down projection.
import type { PeftMethod } from '../method.ts';
import type { Ia3Config } from './config.ts';
import { ia3ConfigFromJson, ia3ConfigFromSpec, ia3ConfigToJson } from './config.ts';
import { Ia3Layers, declareIa3 } from './layer.ts';

export type { Ia3Config } from './config.ts';
export { IA3_FIELDS } from './config.ts';
export { IA3_STATE } from './layer.ts';

export const ia3: PeftMethod<Ia3Config> = {
  name: 'ia3',
  peftType: 'IA3',
  fromSpec: ia3ConfigFromSpec,
  fromJson: ia3ConfigFromJson,
  toJson: ia3ConfigToJson,
  declare: declareIa3,
  create: (model, config, ctx) => new Ia3Layers(model, config, ctx),
};
