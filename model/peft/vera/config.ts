import type { ConfigOf } from '../fields.ts';
import { configError, int, layerList, neutral, num, readJson, readSpec, targetModules, writeJson } from '../fields.ts';

/** VeRA's fields with PEFT's names (peft/tuners/vera/config.py) and defaults. */
export const VERA_FIELDS = {
  r: int('r', { min: 1, default: 256 }),
  targetModules: targetModules('target_modules', ['q_proj', 'v_proj']),
  layersToTransform: layerList('layers_to_transform'),
  /** Seeds the shared projections (Tandem's generator, not PyTorch's: see saveProjection). */
  projectionPrngKey: int('projection_prng_key', { min: 0, default: 0 }),
  saveProjection: neutral('save_projection', true, "Tandem cannot regenerate PyTorch's projections from projection_prng_key; set save_projection to true so vera_A and vera_B travel in the file"),
  veraDropout: num('vera_dropout', { min: 0, max: 1, maxExclusive: true, default: 0 }),
  /** Initial value of every lambda_d entry. */
  dInitial: num('d_initial', { min: 0, default: 0.1 }),
  initWeights: neutral('init_weights', true, 'set init_weights to true'),
  layersPattern: neutral('layers_pattern', null, 'remove layers_pattern'),
  fanInFanOut: neutral('fan_in_fan_out', false, 'LLaMA-family weights are stored [out, in]; set fan_in_fan_out to false'),
  bias: neutral('bias', 'none', 'train biases with the bitfit method; set bias to "none"'),
  modulesToSave: neutral('modules_to_save', null, 'set modules_to_save to null'),
};

export type VeraConfig = ConfigOf<typeof VERA_FIELDS>;

// PEFT's VeraConfig, unlike its LoraConfig, takes "all-linear" with layers_to_transform (the
// shorthand is expanded before layers are matched), so Tandem does too.
function validate(c: VeraConfig, file?: string): VeraConfig {
  if (typeof c.targetModules === 'string' && c.targetModules !== 'all-linear' && c.layersToTransform !== null) {
    throw configError({ field: file ? 'layers_to_transform' : 'layersToTransform', file }, 'cannot be used when target_modules is a regex');
  }
  return c;
}

export const veraConfigFromSpec = (spec: Readonly<Record<string, unknown>>): VeraConfig => validate(readSpec(VERA_FIELDS, spec, 'vera'));
export const veraConfigFromJson = (json: Readonly<Record<string, unknown>>, file: string): VeraConfig => validate(readJson(VERA_FIELDS, json, file), file);
export const veraConfigToJson = (c: VeraConfig): Record<string, unknown> => ({ peft_type: 'VERA', ...writeJson(VERA_FIELDS, c) });
