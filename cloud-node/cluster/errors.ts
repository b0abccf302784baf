// The cluster's errors: a worker's or a gateway's configuration, and what crosses NATS.
import { defineErrors } from '../../common/define-errors.ts';

export const CLUSTER_ERRORS = {
  TANDEM_CLUSTER_BLOCKS_INVALID: { status: 400, template: 'block range {blocks} is invalid: {reason}' },
  TANDEM_CLUSTER_MESSAGE_INVALID: { status: 400, template: 'the cluster message field {field} is invalid: {reason}' },
  TANDEM_CLUSTER_BODY_TOO_LARGE: { status: 413, template: 'a cluster message body of {bytes} bytes cannot cross (limit {limit}): {reason}' },
  TANDEM_CLUSTER_NATS_UNREACHABLE: { status: 503, template: 'cannot reach NATS at {url}: {reason}' },
  TANDEM_CLUSTER_START_FAILED: { status: 500, template: '{process} did not start: {reason}' },
} as const satisfies Record<string, { status: number; template: string }>;

export type ClusterErrorCode = keyof typeof CLUSTER_ERRORS;
export type ClusterErrorDetails = Readonly<Record<string, string | number | boolean>>;

const defined = defineErrors('ClusterError', CLUSTER_ERRORS);

/** The cluster's error; `status` is its HTTP status. */
export class ClusterError extends defined.Base {
  declare readonly status: number;
  declare readonly details: ClusterErrorDetails;

  constructor(code: ClusterErrorCode, details: ClusterErrorDetails = {}, options: { cause?: unknown } = {}) {
    super(code, defined.format(code, details), { details, cause: options.cause });
  }
}
