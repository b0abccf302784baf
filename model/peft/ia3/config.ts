import type { ConfigOf } from '../fields.ts';
import { bool, configError, layerList, neutral, readJson, readSpec, targetModules, unwritten, writeJson } from '../fields.ts';

/** (IA)^3's fields with PEFT's names (peft/tuners/ia3/config.py) and its LLaMA defaults. */
export const IA3_FIELDS = {
  targetModules: targetModules('target_modules', ['k_proj', 'v_proj', 'down_proj']),
  /** Modules whose INPUT is scaled (PEFT's feedforward modules); the others have their output scaled. */
  feedforwardModules: targetModules('feedforward_modules', ['down_proj']),
  /**
   * PEFT's IA3Config has no layers_to_transform. Tandem accepts one and writes it into
   * target_modules as the equivalent regex, so the file stays PEFT's.
   */
  layersToTransform: layerList('layers_to_transform'),
  /** true: every scale starts at 1 (the base model); false: N(0, 1), as torch.randn leaves it. */
  initIa3Weights: bool('init_ia3_weights', true),
  fanInFanOut: neutral('fan_in_fan_out', false, 'LLaMA-family weights are stored [out, in]; set fan_in_fan_out to false'),
  modulesToSave: neutral('modules_to_save', null, 'set modules_to_save to null'),
  // PEFT >= 0.14 only: never written, so that older versions read the file.
  excludeModules: unwritten(neutral('exclude_modules', null, 'narrow target_modules instead')),
};

export type Ia3Config = ConfigOf<typeof IA3_FIELDS>;

const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

function validate(c: Ia3Config, file?: string): Ia3Config {
  const at = (snake: string, camel: string) => ({ field: file ? snake : camel, file });
  if (Array.isArray(c.targetModules) && Array.isArray(c.feedforwardModules)) {
    const missing = (c.feedforwardModules as string[]).filter((f) => !(c.targetModules as string[]).includes(f));
    if (missing.length > 0) throw configError(at('feedforward_modules', 'feedforwardModules'), `must be a subset of target_modules; add ${missing.join(', ')} to target_modules`);
  }
  if (c.layersToTransform === null) return c;
  if (!Array.isArray(c.targetModules)) throw configError(at('layers_to_transform', 'layersToTransform'), 'needs target_modules as a list of module names');
  // The regex PEFT's re.fullmatch applies to module paths such as model.layers.3.mlp.down_proj.
  const regex = `model\\.layers\\.(?:${c.layersToTransform.join('|')})\\.(?:.*\\.)?(?:${(c.targetModules as string[]).map(escape).join('|')})`;
  return { ...c, targetModules: regex, layersToTransform: null };
}

export const ia3ConfigFromSpec = (spec: Readonly<Record<string, unknown>>): Ia3Config => validate(readSpec(IA3_FIELDS, spec, 'ia3'));
export const ia3ConfigFromJson = (json: Readonly<Record<string, unknown>>, file: string): Ia3Config => validate(readJson(IA3_FIELDS, json, file), file);

export function ia3ConfigToJson(c: Ia3Config): Record<string, unknown> {
  const json = writeJson(IA3_FIELDS, c);
  delete json.layers_to_transform; // always folded into target_modules
  return { peft_type: 'IA3', ...json };
}
