// One catalogue of the errors model/ raises. Codes are stable: they are matched by
// callers, shown to users and may travel on the wire inside a protocol Error. Messages are
// written where the error is raised; the entry says what the code means.
import { defineErrors } from '../common/define-errors.ts';

export const MODEL_ERRORS = {
  TANDEM_MODEL_FILE_MISSING: { summary: 'a file the model needs is missing' },
  TANDEM_MODEL_FILE_UNREADABLE: { summary: 'a file could not be read' },
  TANDEM_MODEL_FILE_UNWRITABLE: { summary: 'a file could not be written' },
  TANDEM_MODEL_CONFIG_INVALID: { summary: 'config.json is not a valid model configuration' },
  TANDEM_MODEL_TYPE_UNSUPPORTED: { summary: 'the model_type is not supported' },
  TANDEM_SAFETENSORS_INVALID: { summary: 'a safetensors file breaks the format' },
  TANDEM_SAFETENSORS_TRUNCATED: { summary: 'a safetensors file is shorter than its header says' },
  TANDEM_TENSOR_MISSING: { summary: 'a tensor the model needs is not in the checkpoint' },
  TANDEM_TENSOR_SHAPE_MISMATCH: { summary: 'a tensor has the wrong shape' },
  TANDEM_TENSOR_UNEXPECTED: { summary: 'the checkpoint holds a tensor the configured architecture does not have' },
  TANDEM_TENSOR_DTYPE_UNSUPPORTED: { summary: 'a tensor is stored in a dtype that cannot be loaded' },
  TANDEM_SHARD_INDEX_INVALID: { summary: 'the sharded checkpoint index is invalid' },
  TANDEM_TOKENIZER_INVALID: { summary: 'the tokenizer could not be loaded' },
  TANDEM_BACKEND_UNAVAILABLE: { summary: 'the requested compute backend is not available' },
  TANDEM_INPUT_INVALID: { summary: 'an argument is outside what the model accepts' },
  TANDEM_DATA_INVALID: { summary: 'a training or evaluation data file is malformed' },
  TANDEM_DATA_EMPTY: { summary: 'a data file yields no usable examples' },
  TANDEM_CHECKPOINT_INVALID: { summary: 'a training checkpoint is missing, incomplete or does not match the run' },
  TANDEM_TRAIN_OPTION_INVALID: { summary: 'a training option is outside its allowed range' },
  TANDEM_PEFT_CONFIG_INVALID: { summary: 'a PEFT method configuration is invalid' },
  TANDEM_PEFT_METHOD_UNKNOWN: { summary: 'no PEFT method is registered under that name or peft_type' },
  TANDEM_PEFT_METHOD_DUPLICATE: { summary: 'a PEFT method is already registered under that name' },
  TANDEM_ADAPTER_INVALID: { summary: 'an adapter folder does not match its configuration' },
  TANDEM_MERGE_UNSUPPORTED: { summary: 'a PEFT method of the adapter cannot be merged into the base weights' },
  TANDEM_MODEL_FAMILY_DUPLICATE: { summary: 'a model family is already registered under that model_type' },
  TANDEM_ADAPTER_TOO_LARGE: { summary: 'an adapter configuration would make loading or creating it allocate more than the limit' },
  TANDEM_LOGITS_NON_FINITE: { summary: 'the logits hold a NaN or an infinity: the weights compute no finite output' },
} as const satisfies Record<string, { summary: string }>;

export type ModelErrorCode = keyof typeof MODEL_ERRORS;

export interface ModelErrorOptions {
  /** Where the problem is: a file path, a tensor name, a field. */
  file?: string;
  tensor?: string;
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

const defined = defineErrors('ModelError', MODEL_ERRORS);

/** A typed error with a stable code. The message names the file and the tensor involved. */
export class ModelError extends defined.Base {
  readonly file?: string;
  readonly tensor?: string;
  readonly field?: string;

  constructor(code: ModelErrorCode, message: string, options: ModelErrorOptions = {}) {
    const where = [options.file && `file ${options.file}`, options.tensor && `tensor ${options.tensor}`, options.field && `field ${options.field}`]
      .filter(Boolean)
      .join(', ');
    super(code, `${message}${where ? ` (${where})` : ''}`, { details: options.details, cause: options.cause });
    this.file = options.file;
    this.tensor = options.tensor;
    this.field = options.field;
  }
}
