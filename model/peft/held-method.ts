// The one-method spec of a middle adapter a cloud holds for a session (by the fields of the
// protocol's MiddleAdapterSpec, which model/ does not import): the cloud creates the adapter
// from it, and the edge checks and writes what the cloud hands back with it.
import type { MethodSpec } from './compose.ts';

/** Of the targets a held (IA)^3 may name, those whose input it scales: PEFT's feedforward_modules default for LLaMA-family models. */
export const HELD_IA3_FEEDFORWARD: readonly string[] = ['down_proj'];

export interface HeldMethodFields {
  method: 'lora' | 'ia3';
  rank: number;
  alpha: number;
  targets: readonly string[];
}

/** The spec createAdapter takes for a held adapter on `layers`. */
export function heldMethodSpec(spec: HeldMethodFields, layers: readonly number[]): MethodSpec {
  if (spec.method === 'ia3') {
    return { method: 'ia3', targetModules: [...spec.targets], feedforwardModules: spec.targets.filter((t) => HELD_IA3_FEEDFORWARD.includes(t)), layersToTransform: [...layers] };
  }
  return { method: 'lora', r: spec.rank, loraAlpha: spec.alpha, targetModules: [...spec.targets], layersToTransform: [...layers] };
}
