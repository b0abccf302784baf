// One catalogue of the errors model/ raises. Codes are stable: they are matched by
// callers, shown to users and may travel on the wire inside a protocol Error.

export const MODEL_ERRORS = {
  TANDEM_MODEL_FILE_MISSING: 'a file the model needs is missing',
  TANDEM_MODEL_FILE_UNREADABLE: 'a file could not be read',
  TANDEM_MODEL_FILE_UNWRITABLE: 'a file could not be written',
  TANDEM_MODEL_CONFIG_INVALID: 'config.json is not a valid model configuration',
  TANDEM_MODEL_TYPE_UNSUPPORTED: 'the model_type is not supported',
  TANDEM_SAFETENSORS_INVALID: 'a safetensors file breaks the format',
  TANDEM_SAFETENSORS_TRUNCATED: 'a safetensors file is shorter than its header says',
  TANDEM_TENSOR_MISSING: 'a tensor the model needs is not in the checkpoint',
  TANDEM_TENSOR_SHAPE_MISMATCH: 'a tensor has the wrong shape',
  TANDEM_TENSOR_UNEXPECTED: 'the checkpoint holds a tensor the configured architecture does not have',
  TANDEM_TENSOR_DTYPE_UNSUPPORTED: 'a tensor is stored in a dtype that cannot be loaded',
  TANDEM_SHARD_INDEX_INVALID: 'the sharded checkpoint index is invalid',
  TANDEM_TOKENIZER_INVALID: 'the tokenizer could not be loaded',
  TANDEM_BACKEND_UNAVAILABLE: 'the requested compute backend is not available',
  TANDEM_INPUT_INVALID: 'an argument is outside what the model accepts',
  TANDEM_DATA_INVALID: 'a training or evaluation data file is malformed',
  TANDEM_DATA_EMPTY: 'a data file yields no usable examples',
  TANDEM_CHECKPOINT_INVALID: 'a training checkpoint is missing, incomplete or does not match the run',
  TANDEM_TRAIN_OPTION_INVALID: 'a training option is outside its allowed range',
  TANDEM_PEFT_CONFIG_INVALID: 'a PEFT method configuration is invalid',
  TANDEM_PEFT_METHOD_UNKNOWN: 'no PEFT method is registered under that name or peft_type',
  TANDEM_PEFT_METHOD_DUPLICATE: 'a PEFT method is already registered under that name',
  TANDEM_ADAPTER_INVALID: 'an adapter folder does not match its configuration',
  TANDEM_MERGE_UNSUPPORTED: 'a PEFT method of the adapter cannot be merged into the base weights',
} as const;

export type ModelErrorCode = keyof typeof MODEL_ERRORS;

export interface ModelErrorOptions {
  /** Where the problem is: a file path, a tensor name, a field. */
  file?: string;
  tensor?: string;
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

/** A typed error with a stable code. The message names the file and the tensor involved. */
export class ModelError extends Error {
  override readonly name = 'ModelError';
  readonly code: ModelErrorCode;
  readonly file?: string;
  readonly tensor?: string;
  readonly field?: string;
  readonly details?: Record<string, unknown>;

  constructor(code: ModelErrorCode, message: string, options: ModelErrorOptions = {}) {
    const where = [options.file && `file ${options.file}`, options.tensor && `tensor ${options.tensor}`, options.field && `field ${options.field}`]
      .filter(Boolean)
      .join(', ');
    super(`${code}: ${message}${where ? ` (${where})` : ''}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.file = options.file;
    this.tensor = options.tensor;
    this.field = options.field;
    this.details = options.details;
  }
}
