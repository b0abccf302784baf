import type { LlamaModel } from '../../llama/llama.ts';
import { configError, fieldAt } from '../fields.ts';
import { baseWeightKey } from '../keys.ts';
import type { DeclareContext, DeclaredTensor } from '../method.ts';
import { linearModules, resolveLayers } from '../targets.ts';
import { TrainableWeights } from '../trainable-weights.ts';
import type { BitfitConfig } from './config.ts';

/** The biases BitFit trains, each with its on-disk key; a model without biases in those layers is an error. */
function bitfitBiases(model: LlamaModel, config: BitfitConfig, file?: string): Map<string, string> {
  const layers = new Set(resolveLayers(model, config.layersToTransform, fieldAt(file, 'layers_to_transform', 'layersToTransform')));
  const biases = linearModules(model).flatMap((m) => (m.biasName && layers.has(m.layer) ? [m.biasName] : []));
  if (biases.length === 0) {
    throw configError({ field: 'method', file }, `bitfit trains biases but this model has none in layers ${[...layers].join(', ')} (attention_bias and mlp_bias are false); choose another method such as lora or ia3`);
  }
  return new Map(biases.map((b) => [b, baseWeightKey(b)]));
}

/** The biases BitFit saves (and keeps a copy of, to restore): nothing to bound, the model sizes them. */
export function declareBitfit(model: LlamaModel, config: BitfitConfig, ctx: DeclareContext): DeclaredTensor[] {
  return [...bitfitBiases(model, config, ctx.file)].map(([name, key]) => ({ key, shape: model.weights.get(name)!.shape }));
}

/** Each bias is saved under its base name with PEFT's prefix, as PEFT saves biases (bias="all"). */
export function bitfitWeights(model: LlamaModel, config: BitfitConfig): TrainableWeights {
  const biases = bitfitBiases(model, config);
  return new TrainableWeights(model, biases, [...biases.keys()]);
}
