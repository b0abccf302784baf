// The contract between a cloud node and an edge client beyond the messages: the error codes
// the cloud sends that the edge acts on, the files of an edge part, and the default cut.
// cloud-node sends these and edge-client matches them; neither spells them itself.
import type { Cut } from './messages.ts';

/**
 * Cloud error codes that travel on the wire (ErrorBody.code, REST error bodies' `code`) and
 * that the edge acts on. cloud-node's catalogue holds an entry for each.
 */
export const WIRE_ERRORS = {
  /** The cloud no longer holds a micro-batch's activations: resend Backward with h_B. */
  activationsGone: 'TANDEM_ACTIVATIONS_GONE',
  /** A restarted node listens before its model is loaded: retry. */
  modelNotReady: 'TANDEM_MODEL_NOT_READY',
  /** A store the request passes through (a cluster's object store for bodies over max_payload) is full for now: retry, backing off. */
  storeFull: 'TANDEM_STORE_FULL',
  /** A cluster gateway found the session's held middle adapter written by another gateway since it read it: retry (it reads it again). */
  heldAdapterMoved: 'TANDEM_HELD_ADAPTER_MOVED',
  /** A cluster gateway could not read or write a held middle adapter's checkpoint (JetStream did not answer): retry. */
  heldCheckpointUnavailable: 'TANDEM_HELD_CHECKPOINT_UNAVAILABLE',
  authKeyMissing: 'TANDEM_AUTH_KEY_MISSING',
  authKeyInvalid: 'TANDEM_AUTH_KEY_INVALID',
} as const;

export type WireErrorCode = (typeof WIRE_ERRORS)[keyof typeof WIRE_ERRORS];

/** Codes that refuse the caller's key. */
export const AUTH_ERROR_CODES: readonly WireErrorCode[] = [WIRE_ERRORS.authKeyMissing, WIRE_ERRORS.authKeyInvalid];

/** The weights of an edge part: embedding, bottom and top blocks, final norm, head. */
export const EDGE_WEIGHTS_FILE = 'edge.safetensors';

/** The cut a session gets when its Hello names none (Offsite-Tuning's 2 and 2). */
export const DEFAULT_CUT: Readonly<Cut> = Object.freeze({ bottom: 2, top: 2 });

/**
 * The chunk stream a reply too large for one ack goes on: its leading chunks pushed, the last
 * in the ack. The edge takes pushed chunks only on the reply stream of a request in flight.
 */
export function replyStreamId(requestId: string): string {
  return `${requestId}/reply`;
}
