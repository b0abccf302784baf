// The coordinator's errors: stable codes with HTTP statuses, answered by the federations plugin.
import { defineErrors } from '../../common/define-errors.ts';

export const COORDINATOR_ERRORS = {
  TANDEM_FED_UNKNOWN: { status: 404, template: 'no federation {federation}' },
  TANDEM_FED_EXISTS: { status: 409, template: 'federation {federation} exists already' },
  TANDEM_FED_CONFIG_INVALID: { status: 400, template: 'federation field {field} is invalid: {reason}' },
  TANDEM_FED_NOT_INVITED: { status: 403, template: 'tenant {tenant} is not invited to federation {federation}' },
  TANDEM_FED_NOT_SAMPLED: { status: 403, template: 'tenant {tenant} is not sampled for round {round} attempt {attempt}' },
  TANDEM_FED_UPDATE_LATE: { status: 409, template: 'the update is for round {round} attempt {attempt}; the federation is at round {current} attempt {currentAttempt} ({state})' },
  TANDEM_FED_UPDATE_REPLAY: { status: 409, template: 'tenant {tenant} already sent its update for round {round} attempt {attempt}' },
  TANDEM_FED_UPDATE_SHAPE: { status: 400, template: 'update field {field} is invalid: {reason}' },
  TANDEM_FED_UPDATE_NON_FINITE: { status: 400, template: 'update value {index} is {value}' },
  TANDEM_FED_STATE_CONFLICT: { status: 409, template: 'federation {federation} was changed by another gateway since revision {revision}; nothing was stored: retry' },
  TANDEM_FED_STATE_TOO_LARGE: { status: 507, template: 'federation {federation} state is {bytes} bytes; a JetStream entry holds at most the NATS max_payload of {limit}' },
  TANDEM_FED_STATE_INVALID: { status: 500, template: 'federation state file {file} is invalid: {reason}' },
} as const satisfies Record<string, { status: number; template: string }>;

export type CoordinatorErrorCode = keyof typeof COORDINATOR_ERRORS;
export type CoordinatorErrorDetails = Readonly<Record<string, string | number | boolean>>;

const defined = defineErrors('CoordinatorError', COORDINATOR_ERRORS);

/** The coordinator's error; `status` is its HTTP status. */
export class CoordinatorError extends defined.Base {
  declare readonly status: number;
  declare readonly details: CoordinatorErrorDetails;

  constructor(code: CoordinatorErrorCode, details: CoordinatorErrorDetails = {}) {
    super(code, defined.format(code, details), { details });
  }
}
