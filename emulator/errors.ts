// One catalogue of the errors emulator/ raises. Codes are stable: callers match them, the
// CLI prints them and the cloud node returns the same codes on the wire.
import { defineErrors } from '../common/define-errors.ts';

export const EMULATOR_ERRORS = {
  TANDEM_EMULATOR_KEEP_INVALID: { summary: 'the number of middle blocks to keep is outside what the middle allows' },
  TANDEM_EMULATOR_OPTION_INVALID: { summary: 'an emulator option is outside its allowed range' },
  TANDEM_BUNDLE_INVALID: { summary: 'an emulator bundle is missing a file or breaks its format' },
  TANDEM_BUNDLE_CHECKSUM_MISMATCH: { summary: 'a file of an emulator bundle does not match the checksum its manifest records' },
  TANDEM_ADAPTER_BASE_MISMATCH: { summary: 'the adapter was trained against another base model than this one' },
  TANDEM_OFFSITE_LAYER_INVALID: { summary: 'an offsite adapter may train only the bottom and top blocks' },
  TANDEM_OFFSITE_RECORD_INVALID: { summary: 'an offsite adapter folder lacks a valid tandem_offsite.json' },
} as const satisfies Record<string, { summary: string }>;

export type EmulatorErrorCode = keyof typeof EMULATOR_ERRORS;

export interface EmulatorErrorOptions {
  file?: string;
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

const defined = defineErrors('EmulatorError', EMULATOR_ERRORS);

/** A typed error with a stable code; the message names the file or field involved. */
export class EmulatorError extends defined.Base {
  readonly file?: string;
  readonly field?: string;

  constructor(code: EmulatorErrorCode, message: string, options: EmulatorErrorOptions = {}) {
    const where = [options.file && `file ${options.file}`, options.field && `field ${options.field}`].filter(Boolean).join(', ');
    super(code, `${message}${where ? ` (${where})` : ''}`, { details: options.details, cause: options.cause });
    this.file = options.file;
    this.field = options.field;
  }
}
