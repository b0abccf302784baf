// The emulated model of a bundle: an ordinary LLaMA of B + K + T blocks (bottom, kept
// middle, top, renumbered), so local training with the cut (B, T) and a LocalMiddle runs on
// it unchanged.
import { LlamaModel, parseModelConfig, saveModelFolder } from '../model/index.ts';
import { emulatedRawConfig, emulatedWeights } from './bundle.ts';
import type { Bundle } from './bundle.ts';

/** The emulated model in memory. */
export function emulatedModel(bundle: Bundle): LlamaModel {
  const config = parseModelConfig(emulatedRawConfig(bundle.rawConfig, bundle.layout));
  return LlamaModel.fromArrays(config, emulatedWeights(bundle.layout, bundle.edgeWeights, bundle.emulatorWeights));
}

/** Writes the emulated model as a Hugging Face model folder (float32, with the bundle's tokenizer). */
export async function writeEmulatedModelFolder(bundle: Bundle, dir: string): Promise<void> {
  await saveModelFolder(dir, emulatedRawConfig(bundle.rawConfig, bundle.layout), emulatedWeights(bundle.layout, bundle.edgeWeights, bundle.emulatorWeights), { copyFiles: bundle.tokenizerFiles });
}
