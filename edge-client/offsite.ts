// Offsite training (`tandem edge offsite`): adapters trained against an emulator bundle with no
// connection to the cloud. The bundle's emulated model is written out as a model folder and
// trained by model/'s local loop with the bundle's cut, so the emulator stands in for the
// middle; the adapter is then rewritten in the full model's block numbers for upload.
import { join } from 'node:path';
import { trainLocal } from '../model/index.ts';
import type { MethodSpec, TrainEvent, TrainLocalOptions, TrainSummary } from '../model/index.ts';
import { emulatedSpecs, readBundle, remapAdapterToFullModel, writeEmulatedModelFolder, writeOffsiteRecord } from '../emulator/index.ts';
import type { BundleManifest, OffsiteRecord } from '../emulator/index.ts';

/** In the output folder: the emulated model, the local run (emulated numbering), the adapter to upload. */
export const OFFSITE_MODEL_DIR = 'emulated-model';
export const OFFSITE_RUN_DIR = 'run';
export const OFFSITE_ADAPTER_DIR = 'adapter';

export interface OffsiteTrainOptions extends Omit<TrainLocalOptions, 'modelDir' | 'outDir' | 'cut' | 'methods'> {
  bundleDir: string;
  outDir: string;
  /** PEFT specs in the full model's block numbers; without layersToTransform a method trains the bottom and top blocks. */
  methods: MethodSpec[];
}

export interface OffsiteTrainResult {
  summary: TrainSummary;
  manifest: BundleManifest;
  /** The adapter in the full model's block numbers, with tandem_offsite.json (when all steps are done). */
  adapterDir?: string;
  /** The adapter as trained, on the emulated model's numbering. */
  emulatedAdapterDir?: string;
  emulatedModelDir: string;
}

/** Trains against the emulator in `bundleDir` (verified first: a changed byte stops it). */
export async function trainOffsite(options: OffsiteTrainOptions, onEvent: (e: TrainEvent) => void = () => undefined): Promise<OffsiteTrainResult> {
  const { bundleDir, outDir, methods, ...recipe } = options;
  const bundle = await readBundle(bundleDir);
  const { manifest, layout } = bundle;
  const specs = emulatedSpecs(methods, layout);
  const emulatedModelDir = join(outDir, OFFSITE_MODEL_DIR);
  await writeEmulatedModelFolder(bundle, emulatedModelDir);
  const summary = await trainLocal({ ...recipe, modelDir: emulatedModelDir, outDir: join(outDir, OFFSITE_RUN_DIR), cut: { ...manifest.cut }, methods: specs }, onEvent);
  if (!summary.finished || summary.adapterDir === undefined) return { summary, manifest, emulatedModelDir };
  const adapterDir = join(outDir, OFFSITE_ADAPTER_DIR);
  await remapAdapterToFullModel({
    emulatedAdapterDir: summary.adapterDir, specs, layout, config: bundle.config, edgeWeights: bundle.edgeWeights, outDir: adapterDir, baseModel: manifest.baseModel.id,
  });
  const record: OffsiteRecord = {
    format: 'tandem-offsite-adapter',
    version: 1,
    baseModel: { id: manifest.baseModel.id, contentHash: manifest.baseModel.contentHash },
    cut: { ...manifest.cut },
    keptLayers: [...manifest.keptLayers],
    bundleChecksum: manifest.checksum,
  };
  await writeOffsiteRecord(adapterDir, record);
  return { summary, manifest, adapterDir, emulatedAdapterDir: summary.adapterDir, emulatedModelDir };
}
