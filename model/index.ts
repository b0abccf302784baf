// The only module other folders import from model/.
export { SUPPORTED_MODEL_TYPES, expectedTensorShapes, parseModelConfig } from './config.ts';
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
  serializeSafetensors,
  toFloat32,
  writeFileAtomic,
  writeSafetensorsFile,
} from './safetensors.ts';
export type { FloatDtype, SafetensorsContents, SafetensorsDtype, SafetensorsTensor, SafetensorsTensorInput, SafetensorsTensorsInput } from './safetensors.ts';
export {
  CONFIG_FILE,
  SAFETENSORS_FILE,
  SAFETENSORS_INDEX_FILE,
  TOKENIZER_FILE,
  loadModelFolder,
  modelContentHash,
  readModelConfig,
  readShardIndex,
  saveModelFolder,
  writeShardedSafetensors,
} from './checkpoint.ts';
export type { LoadedModel, SaveModelOptions, ShardedWriteOptions, Weight, Weights, WeightsInput } from './checkpoint.ts';
export { TOKENIZER_CONFIG_FILE, loadTokenizer } from './tokenizer.ts';
export type { DecodeOptions, EncodeOptions, Tokenizer } from './tokenizer.ts';
