// One catalogue of the errors edge-client/ raises. Codes are stable: users and scripts
// match on them; errors from the cloud keep the cloud's code in `remoteCode`.

export const EDGE_ERRORS = {
  TANDEM_EDGE_OPTION_INVALID: 'an edge option is outside what the client accepts',
  TANDEM_EDGE_AUTH_FAILED: 'the cloud refused the key',
  TANDEM_EDGE_HTTP_FAILED: 'a REST request to the cloud failed',
  TANDEM_EDGE_MODEL_UNKNOWN: 'the cloud serves no model with that id, or not with that cut',
  TANDEM_EDGE_RESPONSE_INVALID: 'the cloud answered with something the contract does not allow',
  TANDEM_EDGE_DOWNLOAD_CORRUPT: 'a downloaded file does not match the manifest',
  TANDEM_EDGE_CONNECT_FAILED: 'the data-plane connection to the cloud could not be made',
  TANDEM_EDGE_REQUEST_FAILED: 'a request got no answer after every retry',
  TANDEM_EDGE_REMOTE_ERROR: 'the cloud answered a request with an error',
  TANDEM_EDGE_SESSION_LOST: 'the session could not be reattached after a reconnect',
  TANDEM_EDGE_CLOSED: 'the connection was closed by this client',
  TANDEM_EDGE_CHECKPOINT_MISMATCH: 'the checkpoint was written by a different run',
  TANDEM_EDGE_TLS_UNTRUSTED: 'the cloud\'s TLS certificate is not trusted (pass --ca for a private CA)',
} as const;

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

export class EdgeError extends Error {
  override readonly name = 'EdgeError';
  readonly code: EdgeErrorCode;
  readonly field?: string;
  readonly where?: string;
  readonly remoteCode?: string;
  readonly details: Record<string, unknown>;

  constructor(code: EdgeErrorCode, message: string, options: EdgeErrorOptions = {}) {
    const at = [options.field && `field ${options.field}`, options.where].filter(Boolean).join(', ');
    super(`${code}: ${message}${at ? ` (${at})` : ''}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.field = options.field;
    this.where = options.where;
    this.remoteCode = options.remoteCode;
    this.details = options.details ?? {};
  }
}
