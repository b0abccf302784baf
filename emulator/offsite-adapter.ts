// Adapters trained against an emulator, and the block numbering they are saved in. The
// emulated model numbers its blocks 0..B+K+T-1; on disk an offsite adapter uses the full
// model's numbers (top block B+K+t of the emulated model is L-T+t of the full model), so it
// loads into the full model with loadAdapter unchanged.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ADAPTER_WEIGHTS_FILE, LlamaModel, createAdapter, readSafetensorsFile, renameLayer, saveAdapter, tf, toFloat32 } from '../model/index.ts';
import type { MethodSpec, ModelConfig, Weights } from '../model/index.ts';
import { EmulatorError } from './errors.ts';
import { edgeLayers, toEmulatedLayer, toFullLayer } from './layer-drop.ts';
import type { Cut, EmulatorLayout } from './layer-drop.ts';

/** Methods without a layer choice (they act on the embeddings, not on blocks). */
const LAYERLESS_METHODS = new Set(['prompt_tuning']);

/** Beside adapter_config.json: which base model and emulator an offsite adapter was trained against. */
export const OFFSITE_FILE = 'tandem_offsite.json';

export interface OffsiteRecord {
  format: 'tandem-offsite-adapter';
  version: 1;
  baseModel: { id: string; contentHash: string };
  cut: Cut;
  keptLayers: number[];
  /** The checksum of the bundle the adapter was trained on. */
  bundleChecksum: string;
}

function layersOf(spec: MethodSpec): number[] | undefined {
  const l = spec.layersToTransform;
  if (l === undefined || l === null) return undefined;
  if (!Array.isArray(l) || !l.every((x) => Number.isInteger(x))) throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `layersToTransform must be a list of block indices, got ${JSON.stringify(l)}`, { field: 'layersToTransform' });
  return l as number[];
}

/**
 * The specs to train on the emulated model, from specs in the full model's block numbers:
 * a method without layersToTransform gets the bottom and top blocks; naming a middle block
 * is TANDEM_OFFSITE_LAYER_INVALID (the middle the adapter would train is not the one it
 * plugs into).
 */
export function emulatedSpecs(specs: readonly MethodSpec[], layout: EmulatorLayout): MethodSpec[] {
  const edge = edgeLayers(layout);
  return specs.map((spec) => {
    if (LAYERLESS_METHODS.has(spec.method)) return { ...spec };
    const layers = layersOf(spec) ?? edge;
    const bad = layers.filter((l) => !edge.includes(l));
    if (bad.length > 0) {
      throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `${spec.method} names block ${bad.join(', ')}, which is in the middle or outside the model; offsite adapters train the bottom and top blocks ${edge.join(', ') || '(none)'}`, {
        field: 'layersToTransform',
      });
    }
    if (layers.length === 0) throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `${spec.method} needs a bottom or top block to train; the cut (${layout.cut.bottom}, ${layout.cut.top}) leaves none`, { field: 'layersToTransform' });
    return { ...spec, layersToTransform: layers.map((l) => toEmulatedLayer(layout, l) as number) };
  });
}

/** The same specs in the full model's block numbers. */
export function fullModelSpecs(specs: readonly MethodSpec[], layout: EmulatorLayout): MethodSpec[] {
  return specs.map((spec) => {
    const layers = layersOf(spec);
    return layers === undefined ? { ...spec } : { ...spec, layersToTransform: layers.map((j) => toFullLayer(layout, j)) };
  });
}

export interface RemapOptions {
  /** The adapter folder saved on the emulated model (emulated block numbers). */
  emulatedAdapterDir: string;
  /** The specs it was trained with, in emulated block numbers (emulatedSpecs). */
  specs: readonly MethodSpec[];
  layout: EmulatorLayout;
  /** The full model's config and its edge weights (what the bundle ships). */
  config: ModelConfig;
  edgeWeights: Weights;
  outDir: string;
  baseModel?: string;
}

/**
 * Rewrites an adapter trained on the emulated model as an adapter of the full model: the same
 * methods on the full model's block numbers, every tensor renamed (model.layers.{j} →
 * model.layers.{full index}) and copied. The set of tensors must match exactly.
 */
export async function remapAdapterToFullModel(options: RemapOptions): Promise<void> {
  const file = join(options.emulatedAdapterDir, ADAPTER_WEIGHTS_FILE);
  const saved = await readSafetensorsFile(file);
  // A model of the full numbering holding just the edge: enough for the adapter's shapes.
  const shell = LlamaModel.fromArrays(options.config, options.edgeWeights);
  const adapter = createAdapter(shell, fullModelSpecs(options.specs, options.layout), { seed: 0 });
  try {
    const state = adapter.state();
    const seen = new Set<string>();
    for (const [key, entry] of saved.tensors) {
      const fullKey = renameLayer(key, (j) => toFullLayer(options.layout, j));
      const target = state.get(fullKey);
      if (!target) throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `the adapter holds ${key}, which has no place in the full model's adapter (as ${fullKey})`, { file });
      const want = target.variable.shape;
      if (entry.shape.length !== want.length || entry.shape.some((d, i) => d !== want[i])) throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `${key} has shape [${entry.shape}], the full model's adapter needs [${want}]`, { file });
      const values = toFloat32(entry, file, key);
      tf.tidy(() => target.variable.assign(tf.tensor(values, want, 'float32')));
      seen.add(fullKey);
    }
    const missing = [...state.keys()].filter((k) => !seen.has(k));
    if (missing.length > 0) throw new EmulatorError('TANDEM_OFFSITE_LAYER_INVALID', `the adapter lacks ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', ...' : ''}`, { file });
    await saveAdapter(adapter, options.outDir, { baseModel: options.baseModel ?? null });
  } finally {
    adapter.dispose();
    shell.dispose();
  }
}

export async function writeOffsiteRecord(dir: string, record: OffsiteRecord): Promise<void> {
  await writeFile(join(dir, OFFSITE_FILE), `${JSON.stringify(record, null, 2)}\n`);
}

/** Reads tandem_offsite.json of an adapter folder; TANDEM_OFFSITE_RECORD_INVALID when absent or malformed. */
export async function readOffsiteRecord(dir: string): Promise<OffsiteRecord> {
  const path = join(dir, OFFSITE_FILE);
  let json: unknown;
  try {
    json = JSON.parse(await readFile(path, 'utf8'));
  } catch (cause) {
    throw new EmulatorError('TANDEM_OFFSITE_RECORD_INVALID', `the adapter folder has no readable ${OFFSITE_FILE}; it names the base model the adapter was trained against`, { file: path, cause });
  }
  const r = json as Partial<OffsiteRecord>;
  if (r?.format !== 'tandem-offsite-adapter' || typeof r.baseModel?.contentHash !== 'string' || typeof r.baseModel.id !== 'string') {
    throw new EmulatorError('TANDEM_OFFSITE_RECORD_INVALID', 'not a tandem offsite record (format, baseModel.id, baseModel.contentHash)', { file: path });
  }
  return r as OffsiteRecord;
}

const bare = (h: string): string => h.replace(/^sha256:/, '').toLowerCase();

/** TANDEM_ADAPTER_BASE_MISMATCH unless the adapter was trained against this model (hashes with or without "sha256:"). */
export function checkAdapterBase(trainedAgainst: string, served: string, model = 'the model'): void {
  if (bare(trainedAgainst) !== bare(served)) {
    throw new EmulatorError('TANDEM_ADAPTER_BASE_MISMATCH', `the adapter was trained against content hash ${trainedAgainst}; ${model} has ${served}`, { field: 'baseContentHash', details: { expected: served, actual: trainedAgainst } });
  }
}
