import type { LlamaModel } from '../../llama/llama.ts';
import { resolveLayers } from '../targets.ts';
import { TrainableWeights } from '../trainable-weights.ts';
import type { BlockConfig } from './config.ts';

/** Every weight of the chosen blocks, saved under its own Hugging Face name (a partial model checkpoint). */
export function blockWeights(model: LlamaModel, config: BlockConfig): TrainableWeights {
  const layers = resolveLayers(model, config.layersToTransform, { field: 'layersToTransform' });
  const prefixes = layers.map((l) => `model.layers.${l}`);
  const names = [...model.weights.keys()].filter((n) => prefixes.some((p) => n.startsWith(`${p}.`)));
  return new TrainableWeights(model, new Map(names.map((n) => [n, n])), prefixes);
}
