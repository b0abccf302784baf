// The errors of the federation math. Codes are stable and travel on the wire: the cloud's
// coordinator answers a bad update with one of these codes.
import { defineErrors } from '../../common/define-errors.ts';

export const FEDERATION_ERRORS = {
  TANDEM_FED_UPDATE_SHAPE: { summary: 'an update does not have the shape or size of the global adapter' },
  TANDEM_FED_UPDATE_NON_FINITE: { summary: 'an update holds NaN or infinite values' },
  TANDEM_FED_AGGREGATION_INVALID: { summary: 'the aggregation settings or inputs are invalid' },
  TANDEM_FED_SECAGG_INVALID: { summary: 'a secure-aggregation message or setting is invalid' },
  TANDEM_FED_SECAGG_BELOW_THRESHOLD: { summary: 'too few owners remain to recover the masks of a round' },
  TANDEM_FED_SHAMIR_INVALID: { summary: 'Shamir shares are malformed or too few' },
  TANDEM_FED_DP_INVALID: { summary: 'a differential-privacy setting is outside its allowed range' },
  TANDEM_FED_DP_BUDGET_EXCEEDED: { summary: 'the round would exceed the privacy budget' },
} as const satisfies Record<string, { summary: string }>;

export type FederationErrorCode = keyof typeof FEDERATION_ERRORS;

export interface FederationErrorOptions {
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

const defined = defineErrors('FederationError', FEDERATION_ERRORS);

/** A typed error with a stable code; the message names the field and the limit. */
export class FederationError extends defined.Base {
  readonly field?: string;

  constructor(code: FederationErrorCode, message: string, options: FederationErrorOptions = {}) {
    super(code, `${message}${options.field ? ` (field ${options.field})` : ''}`, { details: options.details, cause: options.cause });
    this.field = options.field;
  }
}
