// The only module other folders import from emulator/.
export { BUNDLE_FORMAT, BUNDLE_VERSION, EDGE_WEIGHTS_FILE, EMULATOR_WEIGHTS_FILE, MANIFEST_FILE, bundleChecksum, canonicalJson, emulatedRawConfig, emulatedWeights, encodeBundle, parseManifest, readBundle, verifyBundle, writeBundleFiles } from './bundle.ts';
export type { Bundle, BundleContents, BundleFile, BundleManifest, Distillation, Fidelity, ManifestBody } from './bundle.ts';
export { DEFAULT_EMULATOR_CUT, buildEmulator, describeFidelity } from './build.ts';
export type { BuildEmulatorOptions, DistillSettings, EmulateEvent } from './build.ts';
export { DEFAULT_DISTILL_LAMBDA, distillEmulator } from './distill.ts';
export type { DistillOptions, DistillResult } from './distill.ts';
export { EMULATOR_ERRORS, EmulatorError } from './errors.ts';
export type { EmulatorErrorCode, EmulatorErrorOptions } from './errors.ts';
export { measureFidelity } from './fidelity.ts';
export type { FidelityFigures } from './fidelity.ts';
export { checkLayout, edgeLayers, emulatedLayerCount, emulatorLayout, keptMiddleIndices, toEmulatedLayer, toFullLayer } from './layer-drop.ts';
export type { Cut, EmulatorLayout } from './layer-drop.ts';
export { OFFSITE_FILE, checkAdapterBase, emulatedSpecs, fullModelSpecs, readOffsiteRecord, remapAdapterToFullModel, writeOffsiteRecord } from './offsite-adapter.ts';
export type { OffsiteRecord, RemapOptions } from './offsite-adapter.ts';
export { QUANTIZATIONS, SCALE_SUFFIX, dequantizeInt8Rows, quantizeInt8Rows } from './quantize.ts';
export type { Int8Rows, Quantization } from './quantize.ts';
export { emulatedModel, writeEmulatedModelFolder } from './emulated-model.ts';
