// The errors of the federation math. Codes are stable and travel on the wire: the cloud's
// coordinator answers a bad update with one of these codes.

export const FEDERATION_ERRORS = {
  TANDEM_FED_UPDATE_SHAPE: 'an update does not have the shape or size of the global adapter',
  TANDEM_FED_UPDATE_NON_FINITE: 'an update holds NaN or infinite values',
  TANDEM_FED_AGGREGATION_INVALID: 'the aggregation settings or inputs are invalid',
  TANDEM_FED_SECAGG_INVALID: 'a secure-aggregation message or setting is invalid',
  TANDEM_FED_SECAGG_BELOW_THRESHOLD: 'too few owners remain to recover the masks of a round',
  TANDEM_FED_SHAMIR_INVALID: 'Shamir shares are malformed or too few',
  TANDEM_FED_DP_INVALID: 'a differential-privacy setting is outside its allowed range',
  TANDEM_FED_DP_BUDGET_EXCEEDED: 'the round would exceed the privacy budget',
} as const;

export type FederationErrorCode = keyof typeof FEDERATION_ERRORS;

export interface FederationErrorOptions {
  field?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

/** A typed error with a stable code; the message names the field and the limit. */
export class FederationError extends Error {
  override readonly name = 'FederationError';
  readonly code: FederationErrorCode;
  readonly field?: string;
  readonly details?: Record<string, unknown>;

  constructor(code: FederationErrorCode, message: string, options: FederationErrorOptions = {}) {
    super(`${code}: ${message}${options.field ? ` (field ${options.field})` : ''}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.field = options.field;
    this.details = options.details;
  }
}
