// The one PEFT folder of a split run whose middle adapter the cloud held: the edge's bottom
// and top parts and the middle part the cloud handed over at the end, in one
// adapter_config.json + adapter_model.safetensors. When the edge trains one LoRA of the
// middle's rank, alpha and targets, the folder is a plain PEFT LoRA over all their layers
// (layers_to_transform the union); otherwise it is the composite config saveAdapter writes.
import { join } from 'node:path';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, COMPOSITE_PEFT_TYPE, defaultRegistry, heldMethodSpec, planAdapterConfigs, writeFileAtomic, writeSafetensorsFile } from '../model/index.ts';
import type { Cut, LlamaModel, MethodSpec } from '../model/index.ts';
import type { MiddleAdapterSpec } from '../protocol/index.ts';
import { mkdir } from 'node:fs/promises';

export interface SplitAdapterParts {
  edgeMethods: readonly MethodSpec[];
  middle: MiddleAdapterSpec;
  /** Every tensor, the edge's and the middle's, by PEFT key. */
  tensors: ReadonlyMap<string, { shape: number[]; data: Float32Array }>;
  edgeKeys: ReadonlySet<string>;
  baseModel?: string;
}

const LAYER = /\.layers\.(\d+)\./;

function layersOf(keys: Iterable<string>): number[] {
  const set = new Set<number>();
  for (const k of keys) {
    const m = LAYER.exec(k);
    if (m) set.add(Number(m[1]));
  }
  return [...set].sort((a, b) => a - b);
}

const sameTargets = (a: unknown, b: readonly string[]): boolean => Array.isArray(a) && a.length === b.length && [...a].sort().join(',') === [...b].sort().join(',');

/** The adapter_config.json of the whole adapter. */
export function splitAdapterConfig(p: SplitAdapterParts): Record<string, unknown> {
  const registry = defaultRegistry();
  const common = { base_model_name_or_path: p.baseModel ?? null, revision: null, inference_mode: true, task_type: 'CAUSAL_LM' };
  const middleLayers = layersOf([...p.tensors.keys()].filter((k) => !p.edgeKeys.has(k)));
  const edgeLayers = layersOf(p.edgeKeys);
  const lora = registry.get('lora');
  const middleSpec = heldMethodSpec(p.middle, middleLayers);
  const [only] = p.edgeMethods;
  const plain = p.middle.method === 'lora' && p.edgeMethods.length === 1 && only.method === 'lora' && (only.r ?? 8) === p.middle.rank && (only.loraAlpha ?? 8) === p.middle.alpha
    && sameTargets(only.targetModules ?? ['q_proj', 'v_proj'], p.middle.targets) && !only.useDora && !only.useRslora;
  if (plain) {
    const layers = [...new Set([...edgeLayers, ...middleLayers])].sort((a, b) => a - b);
    return { ...lora.toJson(lora.fromSpec({ ...only, layersToTransform: layers })), ...common };
  }
  const edge = p.edgeMethods.map((m) => {
    const method = registry.get(m.method);
    const spec = m.method === 'lora' && m.layersToTransform === undefined ? { ...m, layersToTransform: edgeLayers } : m;
    return { tandem_method: method.name, ...method.toJson(method.fromSpec(spec)) };
  });
  const middle = registry.get(middleSpec.method);
  return { peft_type: COMPOSITE_PEFT_TYPE, ...common, methods: [...edge, { tandem_method: middle.name, ...middle.toJson(middle.fromSpec(middleSpec)) }] };
}

/**
 * The tensors the cloud's middle adapter must hand over, by PEFT key: the spec the session
 * asked for on every middle block, shaped as the same spec on the edge's last block (a
 * LLaMA's blocks are alike). What the cloud sends is checked against it before it is decoded.
 */
export function middleAdapterLayout(model: LlamaModel, spec: MiddleAdapterSpec, cut: Cut): Map<string, readonly number[]> {
  const template = model.numLayers - 1;
  const method = defaultRegistry().get(spec.method);
  const plan = planAdapterConfigs(model, [{ method, config: method.fromSpec(heldMethodSpec(spec, [template])) }]);
  const layout = new Map<string, readonly number[]>();
  for (let layer = cut.bottom; layer < model.numLayers - cut.top; layer++) {
    for (const [key, shape] of plan.tensors) layout.set(key.replace(`.layers.${template}.`, `.layers.${layer}.`), shape);
  }
  return layout;
}

export async function writeSplitAdapter(dir: string, p: SplitAdapterParts): Promise<void> {
  const tensors = new Map([...p.tensors].map(([k, t]) => [k, { dtype: 'F32' as const, shape: t.shape, data: t.data }]));
  await mkdir(dir, { recursive: true });
  await writeSafetensorsFile(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: 'pt' });
  await writeFileAtomic(join(dir, ADAPTER_CONFIG_FILE), `${JSON.stringify(splitAdapterConfig(p), null, 2)}\n`);
}
