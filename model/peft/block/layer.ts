import type { LlamaModel } from '../../llama/llama.ts';
import { fieldAt } from '../fields.ts';
import type { DeclareContext, DeclaredTensor } from '../method.ts';
import { resolveLayers } from '../targets.ts';
import { TrainableWeights } from '../trainable-weights.ts';
import type { BlockConfig } from './config.ts';

function blockNames(model: LlamaModel, config: BlockConfig, file?: string): { prefixes: string[]; names: string[] } {
  const layers = resolveLayers(model, config.layersToTransform, fieldAt(file, 'layers_to_transform', 'layersToTransform'));
  const prefixes = layers.map((l) => `model.layers.${l}`);
  const names = [...model.weights.keys()].filter((n) => prefixes.some((p) => n.startsWith(`${p}.`)));
  return { prefixes, names };
}

/** The blocks' weights (saved, and copied to restore them): nothing to bound, the model sizes them. */
export function declareBlock(model: LlamaModel, config: BlockConfig, ctx: DeclareContext): DeclaredTensor[] {
  return blockNames(model, config, ctx.file).names.map((n) => ({ key: n, shape: model.weights.get(n)!.shape }));
}

/** Every weight of the chosen blocks, saved under its own Hugging Face name (a partial model checkpoint). */
export function blockWeights(model: LlamaModel, config: BlockConfig): TrainableWeights {
  const { prefixes, names } = blockNames(model, config);
  return new TrainableWeights(model, new Map(names.map((n) => [n, n])), prefixes);
}
