// The errors model/privacy raises: defenses named or parameterised wrongly, audit inputs out of range.
import { defineErrors } from '../../common/define-errors.ts';

export const PRIVACY_ERRORS = {
  TANDEM_DEFENSE_UNKNOWN: { summary: 'a defense is not one this build knows' },
  TANDEM_DEFENSE_INVALID: { summary: 'a defense parameter is outside its allowed range' },
  TANDEM_AUDIT_INPUT_INVALID: { summary: 'an audit option or its data is outside what the audit accepts' },
} as const satisfies Record<string, { summary: string }>;

export type PrivacyErrorCode = keyof typeof PRIVACY_ERRORS;

const defined = defineErrors('PrivacyError', PRIVACY_ERRORS);

/** A typed error naming the field and the limit it broke. */
export class PrivacyError extends defined.Base {
  readonly field?: string;

  constructor(code: PrivacyErrorCode, message: string, options: { field?: string; details?: Record<string, unknown>; cause?: unknown } = {}) {
    super(code, `${message}${options.field ? ` (field ${options.field})` : ''}`, { details: options.details, cause: options.cause });
    this.field = options.field;
  }
}
