// The only module other folders import from model/: its public surface. Tests and benchmarks
// import synthetic models and backend switching from model/testing.ts.
export { SUPPORTED_MODEL_TYPES, expectedTensorShapes, parseModelConfig } from './config.ts';
export { MODEL_FAMILIES, ModelFamilyRegistry } from './families/index.ts';
export type { ModelFamily } from './families/index.ts';
export type { ModelConfig, ModelType, RopeScaling } from './config.ts';
export { MODEL_ERRORS, ModelError } from './errors.ts';
export type { ModelErrorCode, ModelErrorOptions } from './errors.ts';
export {
  SAFETENSORS_DTYPE_SIZES,
  SAFETENSORS_MAX_HEADER_BYTES,
  floatToBfloat16,
  floatToHalf,
  fromFloat32,
  halfToFloat,
  isSafetensorsDtype,
  parseSafetensors,
  readSafetensorsFile,
  readSafetensorsHeader,
  safetensorsLayout,
  serializeSafetensors,
  toFloat32,
  writeFileAtomic,
  writeSafetensorsFile,
} from './safetensors.ts';
export type { FloatDtype, ParseSafetensorsOptions, ReadSafetensorsOptions, SafetensorsContents, SafetensorsDtype, SafetensorsEntryInput, SafetensorsHeader, SafetensorsLayout, SafetensorsTensor, SafetensorsTensorInput, SafetensorsTensorsInput } from './safetensors.ts';
export {
  CONFIG_FILE,
  SAFETENSORS_FILE,
  SAFETENSORS_INDEX_FILE,
  TOKENIZER_FILE,
  loadModelFolder,
  maxCheckpointTensors,
  modelContentHash,
  readModelConfig,
  readShardIndex,
  saveModelFolder,
  writeShardedSafetensors,
} from './checkpoint.ts';
export type { LoadedModel, SaveModelOptions, ShardedWriteOptions, Weight, Weights, WeightsInput } from './checkpoint.ts';
export { MAX_TOKENIZER_NESTING, MAX_TOKENIZER_PATTERN_CHARS, TOKENIZER_CONFIG_FILE, checkTokenizerFits, loadTokenizer } from './tokenizer.ts';
export { startTsWorker } from './worker-thread.ts';
export type { DecodeOptions, EncodeOptions, Tokenizer } from './tokenizer.ts';
export { BACKENDS, activeBackend, gradients, initBackend, initFirstBackend, parseBackendName, tapedForward, tf } from './backend.ts';
export type { BackendChoice, BackendName, TapedForward } from './backend.ts';
export { HOOK_NAMES, LINEAR_MODULES } from './hooks.ts';
export type { ForwardHooks, HookContext, LinearModule, LinearModuleName, SublayerKind } from './hooks.ts';
export { KvCache, LlamaModel } from './llama/llama.ts';
export type { ForwardOptions } from './llama/llama.ts';
export { IGNORE_INDEX, causalLmLoss } from './loss.ts';
export { GenerationLoop, generate, generateOrt } from './generate.ts';
export type { GenerateOptions, GenerateResult } from './generate.ts';
export { Rng } from './random.ts';
export type { Adapter } from './peft/adapter.ts';
export { CUT_PARTS, cutPartOf, cutPartOfLayer, layerOf, onEdge, renameLayer } from './cut.ts';
export type { CutPart, CutSpec } from './cut.ts';
export { PEFT_MODULE_PREFIX, baseNameOfKey } from './peft/index.ts';
export { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BUILTIN_METHODS, COMPOSITE_PEFT_TYPE, MethodRegistry, ADAPTER_CONFIG_MAX_BYTES, MAX_ADAPTER_TENSORS, checkAdapterWeights, createAdapter, defaultRegistry, HELD_IA3_FEEDFORWARD, heldMethodSpec, planAdapterConfigs, loadAdapter, planAdapter, readAdapterConfig, saveAdapter, specVirtualTokens } from './peft/index.ts';
export type { AdapterPlan, CreateAdapterOptions, HeldMethodFields, LoadAdapterOptions, MethodSpec, PeftAdapter, PlannedAdapter, SaveAdapterOptions } from './peft/index.ts';
export * from './train/index.ts';
export * from './engine/index.ts';
export * from './federation/index.ts';
export * from './privacy/index.ts';
export * from './serving/index.ts';
