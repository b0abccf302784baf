// Which adapters the ONNX Runtime graphs can train, and how their variables map onto the
// graphs' LoRA inputs. The graphs carry plain LoRA (PEFT's lora_A [r, in] and lora_B [out, r]
// on any linear module of any layers); every other method, and LoRA with dropout or DoRA,
// trains on tfjs, with the reason said once at start.
import type { tf } from '../backend.ts';
import type { ModelConfig } from '../config.ts';
import type { LoraParams } from '../engine/ort-llama.ts';
import type { LoraSpec } from '../engine/llama-graphs.ts';
import { loraPaths } from '../engine/llama-graphs.ts';
import { LINEAR_MODULES } from '../hooks.ts';
import type { LinearModuleName } from '../hooks.ts';
import type { Adapter } from '../peft/adapter.ts';
import type { PeftAdapter } from '../peft/compose.ts';
import { PEFT_MODULE_PREFIX } from '../peft/keys.ts';
import { loraScaling } from '../peft/lora/config.ts';
import type { LoraConfig } from '../peft/lora/config.ts';

/** The LoRA of an adapter as the graphs take it: the spec and each module's A and B variables. */
export interface OrtLoraPlan {
  spec: LoraSpec;
  /** By module path. */
  modules: Map<string, { layer: number; a: { key: string; variable: tf.Variable }; b: { key: string; variable: tf.Variable } }>;
}

export type OrtPlanResult = { plan: OrtLoraPlan; reason?: undefined } | { plan?: undefined; reason: string };

const A_SUFFIX = '.lora_A.weight';
const B_SUFFIX = '.lora_B.weight';

/** The plan for `adapter`, or why it stays on tfjs. */
export function ortLoraPlan(adapter: Adapter, config: ModelConfig): OrtPlanResult {
  const methods = (adapter as Partial<PeftAdapter>).methods;
  if (!methods) return { reason: 'the adapter is not a PEFT adapter' };
  const names = methods.map((m) => m.method.name);
  if (methods.length !== 1 || names[0] !== 'lora') return { reason: `${names.join(' + ')} is not plain LoRA, the one method the ONNX graphs carry` };
  if (adapter.numVirtualTokens > 0) return { reason: 'the adapter adds virtual tokens' };
  const c = methods[0].config as LoraConfig;
  if (c.useDora) return { reason: 'DoRA is not in the ONNX graphs' };
  if (c.loraDropout > 0) return { reason: `lora_dropout ${c.loraDropout} draws masks on tfjs (set it to 0 for the ONNX graphs)` };
  const trainable = adapter.trainableVariables();
  const modules: OrtLoraPlan['modules'] = new Map();
  const layerSet = new Set<number>();
  const moduleSet = new Set<LinearModuleName>();
  for (const [key, variable] of trainable) {
    if (!key.startsWith(PEFT_MODULE_PREFIX) || !key.endsWith(A_SUFFIX)) continue;
    const path = key.slice(PEFT_MODULE_PREFIX.length, -A_SUFFIX.length);
    const bKey = `${PEFT_MODULE_PREFIX}${path}${B_SUFFIX}`;
    const b = trainable.get(bKey);
    const parts = path.split('.');
    const layer = Number(parts[2]);
    const name = parts[4] as LinearModuleName;
    if (!b || !(LINEAR_MODULES as readonly string[]).includes(name) || !Number.isInteger(layer)) return { reason: `the LoRA module ${path} has no trainable pair the graphs know` };
    modules.set(path, { layer, a: { key, variable }, b: { key: bKey, variable: b } });
    layerSet.add(layer);
    moduleSet.add(name);
  }
  if (modules.size === 0 || modules.size * 2 !== trainable.size) return { reason: 'the adapter trains more than LoRA pairs' };
  const spec: LoraSpec = {
    r: c.r,
    scaling: loraScaling(c),
    modules: LINEAR_MODULES.filter((m) => moduleSet.has(m)),
    layers: [...layerSet].sort((x, y) => x - y),
  };
  const paths = loraPaths(config, spec);
  if (paths.length !== modules.size || paths.some((p) => !modules.has(p))) return { reason: 'the LoRA modules are not the same on every adapted layer' };
  return { plan: { spec, modules } };
}

/** The plan's current A and B values. */
export function loraParamsOf(plan: OrtLoraPlan): LoraParams {
  const out: LoraParams = new Map();
  for (const [path, m] of plan.modules) out.set(path, { a: m.a.variable.dataSync() as Float32Array, b: m.b.variable.dataSync() as Float32Array });
  return out;
}

/** Whether some LoRA module of the plan sits in blocks [start, end). */
export function planTouches(plan: OrtLoraPlan, start: number, end: number): boolean {
  for (const m of plan.modules.values()) if (m.layer >= start && m.layer < end) return true;
  return false;
}
