// The methods Tandem ships, registered once into the default registry.
import type { PeftMethod } from './method.ts';
import { MethodRegistry } from './registry.ts';
import { bitfit } from './bitfit/index.ts';
import { block } from './block/index.ts';
import { bottleneck } from './bottleneck/index.ts';
import { ia3 } from './ia3/index.ts';
import { dora, lora, loraFa } from './lora/index.ts';
import { promptTuning } from './prompt_tuning/index.ts';
import { vera } from './vera/index.ts';

/** Built-in methods in registration order; the first of each peft_type reads that type's files. */
export const BUILTIN_METHODS: readonly PeftMethod[] = [lora, dora, loraFa, vera, ia3, promptTuning, bottleneck, bitfit, block] as PeftMethod[];

let registry: MethodRegistry | undefined;

/** The registry createAdapter and loadAdapter use unless given another. */
export function defaultRegistry(): MethodRegistry {
  registry ??= new MethodRegistry(BUILTIN_METHODS);
  return registry;
}
