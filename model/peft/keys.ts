// On-disk tensor keys. PEFT saves `base_model.model.<module path>.<state name>[.<param>]`
// with the adapter name ("default") stripped; these helpers derive keys from the state
// names a method declares.

/** The prefix PEFT's PeftModel puts before the base model's own module paths. */
export const PEFT_MODULE_PREFIX = 'base_model.model.';

/** Key of a per-module state tensor: `param` is 'weight' for state held in a Linear (lora_A), absent for a bare Parameter (ia3_l). */
export function moduleStateKey(modulePath: string, stateName: string, param?: string): string {
  return `${PEFT_MODULE_PREFIX}${modulePath}.${stateName}${param ? `.${param}` : ''}`;
}

/** Key of state shared by the whole model (VeRA's projections): `base_model.<name>`. */
export function sharedStateKey(stateName: string): string {
  return `base_model.${stateName}`;
}

/** Key of a base model weight saved as adapter state in PEFT's style (BitFit biases). */
export function baseWeightKey(weightName: string): string {
  return `${PEFT_MODULE_PREFIX}${weightName}`;
}

/** The base model's name for what an adapter key refers to: the key without PEFT's prefix. */
export function baseNameOfKey(key: string): string {
  return key.startsWith(PEFT_MODULE_PREFIX) ? key.slice(PEFT_MODULE_PREFIX.length) : key;
}
