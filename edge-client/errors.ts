// One catalogue of the errors edge-client/ raises. Codes are stable: users and scripts
// match on them; errors from the cloud keep the cloud's code in `remoteCode`.
import { defineErrors } from '../common/define-errors.ts';

export const EDGE_ERRORS = {
  TANDEM_EDGE_OPTION_INVALID: { summary: 'an edge option is outside what the client accepts' },
  TANDEM_EDGE_AUTH_FAILED: { summary: 'the cloud refused the key' },
  TANDEM_EDGE_HTTP_FAILED: { summary: 'a REST request to the cloud failed' },
  TANDEM_EDGE_MODEL_UNKNOWN: { summary: 'the cloud serves no model with that id, or not with that cut' },
  TANDEM_EDGE_RESPONSE_INVALID: { summary: 'the cloud answered with something the contract does not allow' },
  TANDEM_EDGE_DOWNLOAD_CORRUPT: { summary: 'a downloaded file does not match the manifest' },
  TANDEM_EDGE_CONNECT_FAILED: { summary: 'the data-plane connection to the cloud could not be made' },
  TANDEM_EDGE_REQUEST_FAILED: { summary: 'a request got no answer after every retry' },
  TANDEM_EDGE_REMOTE_ERROR: { summary: 'the cloud answered a request with an error' },
  TANDEM_EDGE_SESSION_LOST: { summary: 'the session could not be reattached after a reconnect' },
  TANDEM_EDGE_CLOSED: { summary: 'the connection was closed by this client' },
  TANDEM_EDGE_CHECKPOINT_MISMATCH: { summary: 'the checkpoint was written by a different run' },
  TANDEM_EDGE_TLS_UNTRUSTED: { summary: 'the cloud\'s TLS certificate is not trusted (pass --ca for a private CA)' },
  TANDEM_EDGE_ADAPTER_BASE_MISMATCH: { summary: 'the adapter was trained against another base model than the cloud serves' },
  TANDEM_EDGE_ROUND_MOVED_ON: { summary: 'the federation round moved on (a later round or attempt) before this owner finished its part' },
} as const satisfies Record<string, { summary: string }>;

export type EdgeErrorCode = keyof typeof EDGE_ERRORS;

export interface EdgeErrorOptions {
  /** The flag, option or message field at fault. */
  field?: string;
  /** A file or URL the error is about. */
  where?: string;
  /** The cloud's error code, for TANDEM_EDGE_REMOTE_ERROR. */
  remoteCode?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

const defined = defineErrors('EdgeError', EDGE_ERRORS);

export class EdgeError extends defined.Base {
  readonly field?: string;
  readonly where?: string;
  readonly remoteCode?: string;
  declare readonly details: Record<string, unknown>;

  constructor(code: EdgeErrorCode, message: string, options: EdgeErrorOptions = {}) {
    const at = [options.field && `field ${options.field}`, options.where].filter(Boolean).join(', ');
    super(code, `${message}${at ? ` (${at})` : ''}`, { details: options.details ?? {}, cause: options.cause });
    this.field = options.field;
    this.where = options.where;
    this.remoteCode = options.remoteCode;
  }
}
