import type { LlamaModel } from '../../llama/llama.ts';
import { configError } from '../fields.ts';
import { baseWeightKey } from '../keys.ts';
import { linearModules, resolveLayers } from '../targets.ts';
import { TrainableWeights } from '../trainable-weights.ts';
import type { BitfitConfig } from './config.ts';

/** Each bias is saved under its base name with PEFT's prefix, as PEFT saves biases (bias="all"). */
export function bitfitWeights(model: LlamaModel, config: BitfitConfig): TrainableWeights {
  const layers = new Set(resolveLayers(model, config.layersToTransform, { field: 'layersToTransform' }));
  const biases = linearModules(model).flatMap((m) => (m.biasName && layers.has(m.layer) ? [m.biasName] : []));
  if (biases.length === 0) {
    throw configError({ field: 'method' }, `bitfit trains biases but this model has none in layers ${[...layers].join(', ')} (attention_bias and mlp_bias are false); choose another method such as lora or ia3`);
  }
  return new TrainableWeights(model, new Map(biases.map((b) => [b, baseWeightKey(b)])), biases);
}
