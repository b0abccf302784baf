// One catalogue of the errors cloud-node/ raises. Codes are stable: they are HTTP error
// bodies' `code` and travel on the wire inside protocol Error bodies, so a code is never
// renamed or reused; new ones are appended.
import { STATUS_CODES } from 'node:http';
import { defineErrors } from '../common/define-errors.ts';

export const CLOUD_ERRORS = {
  TANDEM_AUTH_KEY_MISSING: { status: 401, template: 'no API key: send `authorization: Bearer <key>` (REST) or `auth: { key }` (socket.io)' },
  TANDEM_AUTH_KEY_INVALID: { status: 401, template: 'the API key is not valid' },
  TANDEM_AUTH_ADMIN_REQUIRED: { status: 403, template: '{action} needs the admin key' },
  TANDEM_TENANT_INVALID: { status: 400, template: 'tenant {tenant} is invalid: {reason}' },
  TANDEM_MODEL_UNKNOWN: { status: 404, template: 'this node serves no model {model}; it serves {served}' },
  TANDEM_MODEL_MISMATCH: { status: 409, template: 'model {model} has content hash {actual}; the client expects {expected}' },
  TANDEM_MODEL_NOT_READY: { status: 503, template: 'the model is not loaded yet' },
  TANDEM_NODE_CLOSING: { status: 503, template: 'the node is shutting down: {reason}' },
  TANDEM_MODEL_BUSY: { status: 503, template: 'the node is generating at capacity: {waiting} requests are waiting, the limit of {limit}; retry later' },
  TANDEM_CUT_INVALID: { status: 400, template: 'cut bottom={bottom} top={top} is invalid: {reason}' },
  TANDEM_EDGE_FILE_UNKNOWN: { status: 404, template: 'the edge part has no file {name}; it has {files}' },
  TANDEM_SESSION_UNKNOWN: { status: 404, template: 'no session {session}' },
  TANDEM_SESSION_CLOSED: { status: 409, template: 'session {session} is closed' },
  TANDEM_STEP_STALE: { status: 409, template: 'step {step} of session {session} is older than its last step {lastStep} and no reply for it is kept' },
  TANDEM_ACTIVATIONS_GONE: { status: 409, template: 'the activations of session {session} step {step} microbatch {microbatch} are gone ({reason}); resend Backward with h_B as its second frame' },
  TANDEM_SHAPE_MISMATCH: { status: 400, template: '{field} has shape {actual}; expected {expected}' },
  TANDEM_FRAME_COUNT_INVALID: { status: 400, template: '{kind} carries {actual} frames; expected {expected}' },
  TANDEM_FEATURE_UNSUPPORTED: { status: 400, template: '{feature} is not supported by this node' },
  TANDEM_MESSAGE_UNEXPECTED: { status: 400, template: 'the cloud does not take {kind} messages' },
  TANDEM_REQUEST_INVALID: { status: 400, template: 'the request is invalid: {reason}' },
  TANDEM_BODY_STALLED: { status: 408, template: 'the request body sent nothing for {seconds} s; the node closed the connection' },
  TANDEM_ROUTE_UNKNOWN: { status: 404, template: 'no route {method} {url}' },
  TANDEM_STATE_INVALID: { status: 500, template: 'state file {file} is invalid: {reason}' },
  TANDEM_INTERNAL: { status: 500, template: 'internal error: {reason}' },
  TANDEM_EMULATOR_KEEP_INVALID: { status: 400, template: 'keep={keep} is invalid: {reason}' },
  TANDEM_EMULATOR_OPTION_INVALID: { status: 400, template: 'the emulator request is invalid: {reason}' },
  TANDEM_EMULATOR_FILE_UNKNOWN: { status: 404, template: 'the emulator bundle has no file {name}; it has {files}' },
  TANDEM_ADAPTER_BASE_MISMATCH: { status: 409, template: 'the adapter was trained against content hash {actual}; model {model} has {expected}' },
  TANDEM_ADAPTER_INVALID: { status: 400, template: 'the adapter cannot be plugged into model {model}: {reason}' },
  TANDEM_EVAL_DATA_INVALID: { status: 400, template: 'the evaluation data is invalid: {reason}' },
  TANDEM_QUOTA_EXCEEDED: { status: 429, template: 'tenant {tenant} is over its {quota} quota of {limit}: {reason}' },
  TANDEM_AUTH_KEY_REVOKED: { status: 401, template: 'the API key {keyId} was revoked at {revokedAt}' },
  TANDEM_KEY_UNKNOWN: { status: 404, template: 'no API key {keyId}' },
  TANDEM_FIELD_TOO_LONG: { status: 400, template: '{field} holds {actual}; the limit is {limit}' },
  TANDEM_OPTION_INVALID: { status: 500, template: 'node option {option} is {value}: {reason}' },
  TANDEM_TLS_INVALID: { status: 500, template: 'the TLS {field} is invalid: {reason}' },
  TANDEM_MICROBATCH_TOO_LARGE: { status: 400, template: '{field} declares {actual} tokens (batch x sequence), over the limit of {limit}' },
  TANDEM_RESULT_NON_FINITE: { status: 422, template: '{field} of session {session} step {step} holds a NaN or an infinity at element {index} and the session does not allow them' },
  TANDEM_LOGITS_NON_FINITE: { status: 422, template: 'the logits of {model} for generated token {token} hold a NaN or an infinity at vocabulary id {index}: its weights (an adapter\'s scaling, its factors) compute no finite output' },
  TANDEM_CODEC_PARAMS_INVALID: { status: 400, template: 'the {direction} codec {codec} has invalid parameters: {reason}' },
  TANDEM_RESOURCE_EXHAUSTED: { status: 400, template: 'the request needs more {resource} than this node allows: {reason}' },
  TANDEM_COMPUTE_FAILED: { status: 500, template: 'the compute backend failed and was restarted: {reason}' },
  TANDEM_ADAPTER_TOO_LARGE: { status: 400, template: 'the adapter states {field} = {actual}, over the limit of {limit}' },
  TANDEM_SERVE_MODEL_UNKNOWN: { status: 404, template: 'no model {model}; GET /v1/models lists the base and the adapters this key may use as base:adapter' },
  TANDEM_SERVE_ADAPTER_EXISTS: { status: 409, template: 'tenant {tenant} already serves an adapter {name}; delete it first' },
  TANDEM_SERVE_ADAPTER_UNSUPPORTED: { status: 400, template: 'the adapter cannot be served: {reason}' },
  TANDEM_SERVE_PROMPT_TOO_LONG: { status: 400, template: 'the prompt holds {actual}; at most {limit}' },
  TANDEM_SERVE_MAX_TOKENS_TOO_LARGE: { status: 400, template: 'max_tokens {actual} is too large: {reason}' },
  TANDEM_HELD_GRADIENTS_MISSING: { status: 409, template: 'StepCommit of step {step} for session {session} states {expected} micro-batches; the cloud holds the middle adapter\'s gradients of {actual}: send their Backwards again' },
  TANDEM_EVAL_BUSY: { status: 503, template: 'the node is evaluating adapters at capacity: {waiting} evaluations are waiting, the limit of {limit}; retry later' },
  TANDEM_STORE_FULL: { status: 503, template: 'the {store} is full for now: {reason}; retry later' },
  TANDEM_HELD_ADAPTER_MOVED: { status: 503, template: 'the middle adapter of session {session} changed under this gateway ({reason}); retry: it is read again' },
  TANDEM_HELD_CHECKPOINT_UNAVAILABLE: { status: 503, template: 'the checkpoint of the middle adapter of session {session} could not be read or written ({reason}); retry: it is read again' },
} as const satisfies Record<string, { status: number; template: string }>;

export type CloudErrorCode = keyof typeof CLOUD_ERRORS;

export type CloudErrorDetails = Readonly<Record<string, string | number | boolean>>;

const defined = defineErrors('CloudError', CLOUD_ERRORS);

export const isCloudErrorCode = defined.isCode;

/** The error cloud-node/ throws. `status` is its HTTP status; `code` is stable and travels on the wire. */
export class CloudError extends defined.Base {
  declare readonly status: number;
  declare readonly details: CloudErrorDetails;

  constructor(code: CloudErrorCode, details: CloudErrorDetails = {}, options: { cause?: unknown } = {}) {
    super(code, defined.format(code, details), { details, cause: options.cause });
  }
}

/** What an allocation failure (a RangeError for a buffer, a backend out of memory) says. */
const RESOURCE_FAILURE = /array buffer allocation failed|invalid (typed )?array length|out of memory|cannot allocate|failed to allocate/i;

/** TANDEM_RESOURCE_EXHAUSTED (400) for an allocation failure caused by a request; undefined for anything else. */
export function resourceErrorOf(error: unknown, resource: string): CloudError | undefined {
  if (error instanceof CloudError || !(error instanceof Error) || !RESOURCE_FAILURE.test(error.message)) return undefined;
  return new CloudError('TANDEM_RESOURCE_EXHAUSTED', { resource, reason: error.message.slice(0, 200) }, { cause: error });
}

/**
 * A whole HTTP/1.1 response refusing a request with TANDEM_REQUEST_INVALID, for what is answered
 * on the socket before fastify sees it (a request HTTP cannot parse, an Upgrade to a REST path).
 */
export function rawRefusal(status: number, reason: string): string {
  const wrapped = new CloudError('TANDEM_REQUEST_INVALID', { reason });
  const body = JSON.stringify({ code: wrapped.code, message: wrapped.describe(), details: wrapped.details });
  return `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
}

