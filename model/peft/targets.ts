// Which linear modules and layers of a (possibly partial) model a method applies to, with
// PEFT's matching rules for target_modules.
import { LINEAR_MODULES } from '../hooks.ts';
import type { LinearModuleName } from '../hooks.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { FieldAt, TargetModules } from './fields.ts';
import { configError } from './fields.ts';

export interface ModuleInfo {
  /** Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`. */
  path: string;
  layer: number;
  name: LinearModuleName;
  weightName: string;
  /** The bias's name when the model has one. */
  biasName?: string;
  inFeatures: number;
  outFeatures: number;
}

export function moduleGroup(name: LinearModuleName): 'self_attn' | 'mlp' {
  return name === 'gate_proj' || name === 'up_proj' || name === 'down_proj' ? 'mlp' : 'self_attn';
}

/** The block indices whose weights this model holds (all of them, or the cut's share). */
export function heldLayers(model: LlamaModel): number[] {
  const out: number[] = [];
  for (let i = 0; i < model.numLayers; i++) if (model.weights.has(`model.layers.${i}.input_layernorm.weight`)) out.push(i);
  return out;
}

/** Every linear module in the held layers, in model order. */
export function linearModules(model: LlamaModel): ModuleInfo[] {
  const out: ModuleInfo[] = [];
  for (const layer of heldLayers(model)) {
    for (const name of LINEAR_MODULES) {
      const path = `model.layers.${layer}.${moduleGroup(name)}.${name}`;
      const w = model.weights.get(`${path}.weight`);
      if (!w) continue;
      const biasName = model.weights.has(`${path}.bias`) ? `${path}.bias` : undefined;
      out.push({ path, layer, name, weightName: `${path}.weight`, biasName, inFeatures: w.shape[1] as number, outFeatures: w.shape[0] });
    }
  }
  return out;
}

/** PEFT's rule: a string is a regex that must match the whole path; a list entry matches the path or its last dotted parts. */
export function matchesTarget(path: string, targets: TargetModules): boolean {
  if (targets === 'all-linear') return true;
  if (typeof targets === 'string') return new RegExp(`^(?:${targets})$`).test(path);
  return targets.some((t) => path === t || path.endsWith(`.${t}`));
}

/** Checks that every layer asked for is held by this model; returns the layers to use. */
export function resolveLayers(model: LlamaModel, layers: readonly number[] | null, at: FieldAt): number[] {
  const held = heldLayers(model);
  if (layers === null) return held;
  for (const l of layers) {
    if (l >= model.numLayers) throw configError(at, `names layer ${l} but the model has ${model.numLayers} layers (0..${model.numLayers - 1})`);
    if (!held.includes(l)) throw configError(at, `names layer ${l}, which this model part does not hold (it holds ${held.join(', ') || 'none'})`);
  }
  return [...layers].sort((a, b) => a - b);
}

/** The modules a method targets; matching none is an error, as in PEFT. */
export function selectModules(model: LlamaModel, targets: TargetModules, layers: readonly number[] | null, at: { targets: FieldAt; layers: FieldAt }): ModuleInfo[] {
  const use = new Set(resolveLayers(model, layers, at.layers));
  const out = linearModules(model).filter((m) => use.has(m.layer) && matchesTarget(m.path, targets));
  if (out.length === 0) {
    throw configError(at.targets, `${JSON.stringify(targets)} matched no linear module in layers ${[...use].join(', ') || '(none)'}; module names are ${LINEAR_MODULES.join(', ')}`);
  }
  return out;
}
