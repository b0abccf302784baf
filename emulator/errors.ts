// One catalogue of the errors emulator/ raises. Codes are stable: callers match them, the
// CLI prints them and the cloud node returns the same codes on the wire.

export const EMULATOR_ERRORS = {
  TANDEM_EMULATOR_KEEP_INVALID: 'the number of middle blocks to keep is outside what the middle allows',
  TANDEM_EMULATOR_OPTION_INVALID: 'an emulator option is outside its allowed range',
  TANDEM_BUNDLE_INVALID: 'an emulator bundle is missing a file or breaks its format',
  TANDEM_BUNDLE_CHECKSUM_MISMATCH: 'a file of an emulator bundle does not match the checksum its manifest records',
  TANDEM_ADAPTER_BASE_MISMATCH: 'the adapter was trained against another base model than this one',
  TANDEM_OFFSITE_LAYER_INVALID: 'an offsite adapter may train only the bottom and top blocks',
  TANDEM_OFFSITE_RECORD_INVALID: 'an offsite adapter folder lacks a valid tandem_offsite.json',
} as const;

export type EmulatorErrorCode = keyof typeof EMULATOR_ERRORS;

export interface EmulatorErrorOptions {
  file?: string;
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

/** A typed error with a stable code; the message names the file or field involved. */
export class EmulatorError extends Error {
  override readonly name = 'EmulatorError';
  readonly code: EmulatorErrorCode;
  readonly file?: string;
  readonly field?: string;
  readonly details?: Record<string, unknown>;

  constructor(code: EmulatorErrorCode, message: string, options: EmulatorErrorOptions = {}) {
    const where = [options.file && `file ${options.file}`, options.field && `field ${options.field}`].filter(Boolean).join(', ');
    super(`${code}: ${message}${where ? ` (${where})` : ''}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.file = options.file;
    this.field = options.field;
    this.details = options.details;
  }
}
