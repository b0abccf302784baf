// The engine a run trains or evaluates on: an ONNX Runtime engine over the model's frozen
// weights when one is chosen (by the caller, by --engine or by TANDEM_ENGINE), else tfjs alone.
import { activeBackend } from '../backend.ts';
import type { ModelConfig } from '../config.ts';
import type { WeightArrays } from '../engine/llama-graphs.ts';
import { OrtLlama } from '../engine/ort-llama.ts';
import { selectEngine } from '../engine/select.ts';
import type { LlamaModel } from '../llama/llama.ts';

/** An engine already open, an engine name ('auto': the best that starts), false: tfjs alone, or undefined: TANDEM_ENGINE when set, else tfjs. */
export type EngineRequest = OrtLlama | string | false | undefined;

export interface OpenedEngine {
  /** Set when the frozen work runs on ONNX Runtime. */
  engine?: OrtLlama;
  /** The engine's name as logged: ort-cpu, ort-cuda, or the tfjs backend's name. */
  name: string;
  /** Releases the engine when this call opened it. */
  close(): Promise<void>;
}

/** The weights of a model held in tfjs variables, as the arrays an OrtLlama takes. */
export function weightArraysOf(model: LlamaModel): WeightArrays {
  return new Map([...model.weights].map(([name, v]) => [name, { shape: [...v.shape], data: v.dataSync() as Float32Array }]));
}

/** Opens the engine a request names over these weights (read only when ONNX Runtime is chosen). */
export async function openEngine(config: ModelConfig, weights: () => WeightArrays, request: EngineRequest, log?: (line: string) => void): Promise<OpenedEngine> {
  if (request instanceof OrtLlama) return { engine: request, name: request.provider === 'cuda' ? 'ort-cuda' : 'ort-cpu', close: async () => undefined };
  const named = request === false ? undefined : request === undefined ? process.env.TANDEM_ENGINE || undefined : request;
  if (named === undefined) return { name: activeBackend()?.name ?? 'tfjs', close: async () => undefined };
  const choice = await selectEngine({ engine: named === 'auto' ? undefined : named, log });
  if (!choice.ortProvider) return { name: choice.name, close: async () => undefined };
  const engine = await OrtLlama.create(config, weights(), { threads: choice.threads, provider: choice.ortProvider });
  return { engine, name: choice.name, close: () => engine.dispose() };
}
