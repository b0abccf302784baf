// The public API of the PEFT methods; other folders import from here only.
export type { Adapter } from './adapter.ts';
export { createAdapter } from './compose.ts';
export type { AdapterMethod, CreateAdapterOptions, MethodSpec, PeftAdapter } from './compose.ts';
export { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, COMPOSITE_PEFT_TYPE, TANDEM_METHOD_METADATA, loadAdapter, saveAdapter } from './io.ts';
export type { LoadAdapterOptions, SaveAdapterOptions } from './io.ts';
export type { AdapterTensor, CreateContext, MethodInstance, PeftMethod } from './method.ts';
export { BUILTIN_METHODS, defaultRegistry } from './methods.ts';
export { MethodRegistry } from './registry.ts';
export type { TargetModules } from './fields.ts';
export { LORA_FIELDS, dora, lora, loraFa, loraScaling } from './lora/index.ts';
export type { LoraConfig } from './lora/index.ts';
