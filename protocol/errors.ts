// One catalogue of the errors protocol/ raises. Codes are stable and travel on the wire
// inside an Error body, so a code is never renamed or reused; new ones are appended.
import { defineErrors } from '../common/define-errors.ts';

export const PROTOCOL_ERRORS = {
  TANDEM_PROTO_MESSAGE_TOO_LARGE: { number: 4001, template: 'message of {actual} bytes is over the limit of {limit} bytes' },
  TANDEM_PROTO_MESSAGE_MALFORMED: { number: 4002, template: 'message is not a valid Tandem envelope: {reason}' },
  TANDEM_PROTO_VERSION_MISSING: { number: 4003, template: 'message carries no protocol version' },
  TANDEM_PROTO_VERSION_UNSUPPORTED: { number: 4004, template: 'peer speaks protocol {theirs}; this build speaks {ours}' },
  TANDEM_PROTO_FIELD_INVALID: { number: 4005, template: 'field {field} is invalid: {reason}' },
  TANDEM_PROTO_CODEC_UNSUPPORTED: { number: 4006, template: 'codec {codec} is not supported' },
  TANDEM_PROTO_CODEC_PARAMS_INVALID: { number: 4007, template: 'codec parameter {field} is invalid: {reason}' },
  TANDEM_PROTO_CODEC_NEGOTIATION_FAILED: { number: 4008, template: 'no codec offered for {direction} is accepted; accepted: {accepted}' },
  TANDEM_PROTO_FRAME_RANK_EXCEEDED: { number: 4009, template: 'frame {field} has rank {actual}, over the limit of {limit}' },
  TANDEM_PROTO_FRAME_DIM_EXCEEDED: { number: 4010, template: 'frame {field} has a dimension of {actual}, over the limit of {limit}' },
  TANDEM_PROTO_FRAME_ELEMENTS_EXCEEDED: { number: 4011, template: 'frame {field} declares more than {limit} elements' },
  TANDEM_PROTO_FRAME_TOO_LARGE: { number: 4012, template: 'frame {field} has {actual} bytes, over the limit of {limit} bytes' },
  TANDEM_PROTO_FRAME_SHAPE_MISMATCH: { number: 4013, template: 'frame {field} has shape {actual}; the session expects {expected}' },
  TANDEM_PROTO_FRAME_SIZE_MISMATCH: { number: 4014, template: 'frame {field} has {actual} bytes; codec {codec} needs {expected}' },
  TANDEM_PROTO_FRAME_CHECKSUM_MISMATCH: { number: 4015, template: 'frame {field} has crc32 {actual}; its bytes give {expected}' },
  TANDEM_PROTO_FRAME_NON_FINITE: { number: 4016, template: 'frame {field} holds a NaN or an infinity at element {index} and the session does not allow them' },
  TANDEM_PROTO_FRAME_PAYLOAD_INVALID: { number: 4017, template: 'frame {field} payload is invalid: {reason}' },
  TANDEM_PROTO_CHUNK_INVALID: { number: 4018, template: 'chunk {index} of stream {streamId} is invalid: {reason}' },
  TANDEM_PROTO_CHUNK_DUPLICATE: { number: 4019, template: 'chunk {index} of stream {streamId} arrived twice' },
  TANDEM_PROTO_CHUNK_OUT_OF_ORDER: { number: 4020, template: 'chunk {index} of stream {streamId} arrived when chunk {expected} was due (missing or reordered)' },
  TANDEM_PROTO_CHUNK_MISSING: { number: 4021, template: 'stream {streamId} ended with {received} of {count} chunks' },
  TANDEM_PROTO_CHUNK_LIMIT_EXCEEDED: { number: 4022, template: 'reassembly would hold {actual} {field}, over the limit of {limit}' },
  TANDEM_PROTO_INPUT_INVALID: { number: 4023, template: 'argument {field} is invalid: {reason}' },
  TANDEM_PROTO_CHUNK_TIMEOUT: { number: 4024, template: 'stream {streamId} received no chunk for {timeoutMs} ms and was dropped' },
  TANDEM_PROTO_DEFENSE_UNKNOWN: { number: 4025, template: 'defense {name} in {field} is not known; known: {known}' },
  TANDEM_PROTO_MIDDLE_ADAPTER_METHOD_UNKNOWN: { number: 4026, template: 'middle adapter method {method} in {field} is not known; known: {known}' },
  TANDEM_PROTO_MIDDLE_ADAPTER_LIMIT_EXCEEDED: { number: 4027, template: 'middle adapter {field} is {actual}, over the limit of {limit}' },
  TANDEM_PROTO_STEP_COMMIT_OUT_OF_ORDER: { number: 4028, template: 'StepCommit of step {actual} for session {session}: the next step to commit is {expected} (a repeat of {last} answers again)' },
  TANDEM_PROTO_MIDDLE_ADAPTER_INVALID: { number: 4029, template: 'middle adapter field {field} is invalid: {reason}' },
  TANDEM_PROTO_INFER_POSITION_INVALID: { number: 4030, template: 'InferStep position {actual} does not continue session {session}, whose middle cache holds {expected} positions (send 0 to start a new sequence)' },
  TANDEM_PROTO_INFER_CONTEXT_EXCEEDED: { number: 4031, template: 'InferStep reaches position {actual}, over the context of {limit}' },
  TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED: { number: 4032, template: 'the middle KV cache of session {session} would take {actual} bytes, over the limit of {limit}' },
  TANDEM_PROTO_MESSAGE_VALUES_EXCEEDED: { number: 4033, template: 'message would decode into more than {limit} values (fields and repeated elements); counted {actual} before stopping' },
} as const satisfies Record<string, { number: number; template: string }>;

export type ProtocolErrorCode = keyof typeof PROTOCOL_ERRORS;

export type ProtocolErrorDetails = Readonly<Record<string, string | number | boolean>>;

const defined = defineErrors('ProtocolError', PROTOCOL_ERRORS);

export const isProtocolErrorCode = defined.isCode;

/**
 * The only error protocol/ throws. `code` is stable; `details` names the field, the limit and
 * the value found; `describe()` is the line an Error body carries (`CODE (number): message`).
 */
export class ProtocolError extends defined.Base {
  /** The code's number in the catalogue, for peers that match on numbers. */
  declare readonly number: number;
  declare readonly details: ProtocolErrorDetails;

  constructor(code: ProtocolErrorCode, details: ProtocolErrorDetails = {}, options: { cause?: unknown } = {}) {
    super(code, defined.format(code, details), { details, cause: options.cause });
  }
}

/** Wraps anything thrown while decoding untrusted bytes, so callers only ever see ProtocolError. */
export function asProtocolError(error: unknown, fallback: ProtocolErrorCode, details: ProtocolErrorDetails = {}): ProtocolError {
  if (error instanceof ProtocolError) return error;
  const reason = error instanceof Error ? error.message : String(error);
  return new ProtocolError(fallback, { reason, ...details }, { cause: error });
}
