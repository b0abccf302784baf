// The methods Tandem ships, registered once into the default registry.
import type { PeftMethod } from './method.ts';
import { MethodRegistry } from './registry.ts';
import { dora, lora, loraFa } from './lora/index.ts';

/** Built-in methods in registration order; the first of each peft_type reads that type's files. */
export const BUILTIN_METHODS: readonly PeftMethod[] = [lora as PeftMethod, dora as PeftMethod, loraFa as PeftMethod];

let registry: MethodRegistry | undefined;

/** The registry createAdapter and loadAdapter use unless given another. */
export function defaultRegistry(): MethodRegistry {
  registry ??= new MethodRegistry(BUILTIN_METHODS);
  return registry;
}
