import type { ConfigOf } from '../fields.ts';
import { LINEAR_MODULES } from '../../hooks.ts';
import { bool, configError, int, layerList, neutral, num, oneOf, readJson, readSpec, targetModules, unwritten, writeJson } from '../fields.ts';

/** LoRA's fields with PEFT's names (peft/tuners/lora/config.py) and defaults. */
export const LORA_FIELDS = {
  r: int('r', { min: 1, default: 8 }),
  loraAlpha: num('lora_alpha', { min: 0, minExclusive: true, default: 8 }),
  loraDropout: num('lora_dropout', { min: 0, max: 1, maxExclusive: true, default: 0 }),
  targetModules: targetModules('target_modules', ['q_proj', 'v_proj']),
  layersToTransform: layerList('layers_to_transform'),
  /** Scale alpha/sqrt(r) instead of alpha/r (rsLoRA). */
  useRslora: bool('use_rslora', false),
  useDora: bool('use_dora', false),
  /** true: A Kaiming-uniform, B zero; 'gaussian': A ~ N(0, (1/r)^2), B zero; false: A and B both random (the adapter starts non-trivial). */
  initLoraWeights: oneOf('init_lora_weights', [true, false, 'gaussian'], true),
  layersPattern: neutral('layers_pattern', null, 'Tandem knows the layer of every module; remove layers_pattern'),
  fanInFanOut: neutral('fan_in_fan_out', false, 'LLaMA-family weights are stored [out, in]; set fan_in_fan_out to false'),
  bias: neutral('bias', 'none', 'train biases with the bitfit method alongside LoRA; set bias to "none"'),
  modulesToSave: neutral('modules_to_save', null, 'train whole modules with the block method; set modules_to_save to null'),
  rankPattern: neutral('rank_pattern', {}, 'use one rank per method, or several lora methods on different layers'),
  alphaPattern: neutral('alpha_pattern', {}, 'use one lora_alpha per method, or several lora methods on different layers'),
  // lora_bias and exclude_modules arrived in PEFT 0.14; older versions refuse a file naming them.
  loraBias: unwritten(neutral('lora_bias', false, 'set lora_bias to false')),
  layerReplication: neutral('layer_replication', null, 'set layer_replication to null'),
  excludeModules: unwritten(neutral('exclude_modules', null, 'narrow target_modules instead (a list or a regex)')),
};

export type LoraConfig = ConfigOf<typeof LORA_FIELDS>;

/**
 * PEFT fields outside LORA_FIELDS that never change the computation of a loaded adapter:
 * initialization recipes (the weights come from the file), runtime and Megatron settings, and
 * options that act only together with one Tandem refuses (qalora_group_size without use_qalora).
 */
export const LORA_INERT_FIELDS = ['loftq_config', 'eva_config', 'corda_config', 'lora_ga_config', 'runtime_config', 'megatron_core', 'qalora_group_size', 'ensure_weight_tying'];

/**
 * PEFT's LoraConfig refuses layers_to_transform with any string target_modules, "all-linear"
 * included. A spec asking for "all-linear" on some layers is written as the list "all-linear"
 * stands for in a LLaMA block (every linear module; lm_head is outside the blocks), which
 * PEFT reads with the same meaning; a file with the combination is refused as PEFT refuses it.
 */
function expandAllLinear(c: LoraConfig, file: string | undefined): LoraConfig {
  if (typeof c.targetModules !== 'string' || c.layersToTransform === null) return c;
  const at = { field: file ? 'layers_to_transform' : 'layersToTransform', file };
  if (c.targetModules !== 'all-linear') {
    // The regex already decides the layers.
    throw configError(at, 'cannot be used when target_modules is a regex; put the layers in the regex or give target_modules as a list');
  }
  if (file) throw configError(at, `cannot be used with target_modules "all-linear" (PEFT's LoraConfig refuses it too); list the modules instead, e.g. ${JSON.stringify(LINEAR_MODULES)}`);
  return { ...c, targetModules: [...LINEAR_MODULES] };
}

function validate(c: LoraConfig, file?: string): LoraConfig {
  return expandAllLinear(c, file);
}

export function loraConfigFromSpec(spec: Readonly<Record<string, unknown>>, method: string): LoraConfig {
  return validate(readSpec(LORA_FIELDS, spec, method));
}

export function loraConfigFromJson(json: Readonly<Record<string, unknown>>, file: string): LoraConfig {
  return validate(readJson(LORA_FIELDS, json, file, LORA_INERT_FIELDS), file);
}

export function loraConfigToJson(c: LoraConfig): Record<string, unknown> {
  return { peft_type: 'LORA', ...writeJson(LORA_FIELDS, c) };
}

/** The factor of B A in the forward pass. */
export function loraScaling(c: Pick<LoraConfig, 'r' | 'loraAlpha' | 'useRslora'>): number {
  return c.useRslora ? c.loraAlpha / Math.sqrt(c.r) : c.loraAlpha / c.r;
}
