// The base weights with an adapter folded in, as the arrays an ONNX Runtime engine takes:
// how eval and generate run an adapter there without hooks.
import type { WeightArrays } from '../engine/llama-graphs.ts';
import { ModelError } from '../errors.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { Adapter } from '../peft/adapter.ts';

/**
 * The model's weights with `adapter` merged (copies; the model is left unmerged), or the
 * reason when a method of it cannot merge (prompt tuning, for one).
 */
export function mergedWeightArrays(model: LlamaModel, adapter: Adapter): { weights: WeightArrays; reason?: undefined } | { weights?: undefined; reason: string } {
  try {
    adapter.merge();
  } catch (err) {
    if (err instanceof ModelError && err.code === 'TANDEM_MERGE_UNSUPPORTED') return { reason: err.message };
    throw err;
  }
  try {
    return { weights: new Map([...model.weights].map(([name, v]) => [name, { shape: [...v.shape], data: Float32Array.from(v.dataSync() as Float32Array) }])) };
  } finally {
    adapter.unmerge();
  }
}
