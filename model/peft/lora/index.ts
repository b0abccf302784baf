// LoRA and its variants that PEFT saves as LoRA: DoRA (use_dora) and LoRA-FA (A frozen).
import type { PeftMethod } from '../method.ts';
import type { LoraConfig } from './config.ts';
import { loraConfigFromJson, loraConfigFromSpec, loraConfigToJson } from './config.ts';
import { LoraLayers, declareLora } from './layer.ts';

export type { LoraConfig } from './config.ts';
export { LORA_FIELDS, loraScaling } from './config.ts';
export { LORA_STATE } from './layer.ts';

function loraMethod(name: string, variant: { freezeA: boolean; dora: boolean }): PeftMethod<LoraConfig> {
  const check = (c: LoraConfig): LoraConfig => (variant.dora ? { ...c, useDora: true } : c);
  return {
    name,
    peftType: 'LORA',
    fromSpec: (spec) => check(loraConfigFromSpec(spec, name)),
    fromJson: (json, file) => check(loraConfigFromJson(json, file)),
    toJson: loraConfigToJson,
    declare: declareLora,
    create: (model, config, ctx) => new LoraLayers(model, config, ctx, variant),
  };
}

export const lora = loraMethod('lora', { freezeA: false, dora: false });
/** DoRA: LoRA with use_dora forced on; PEFT's own format. */
export const dora = loraMethod('dora', { freezeA: false, dora: true });
/** LoRA-FA: A frozen after initialization, PEFT's LoRA format (marked in the safetensors metadata). */
export const loraFa = loraMethod('lora_fa', { freezeA: true, dora: false });
