// Error feedback for lossy codecs: the sender keeps what the codec lost on each stream
// and adds it to the next tensor of that stream, so over a stream the sum of what was
// received tracks the sum of what was sent (the gap stays one residual, not a growing sum).
import { CODECS } from './codecs/registry.ts';
import { ProtocolError } from './errors.ts';
import type { CodecSpec, TensorFrame } from './messages.ts';
import { encodeTensor } from './tensor-frame.ts';
import type { EncodeTensorOptions } from './tensor-frame.ts';

/**
 * The residuals one ErrorFeedback keeps by default: streams are named by the peer (a micro-batch
 * index each), so what they hold is bounded, the least recently used given up first. A stream
 * given up starts again with no residual: its error feedback restarts, nothing else changes.
 * A micro-batch of 4 x 512 tokens of hidden size 2048 leaves a 16 MiB residual.
 */
export const DEFAULT_FEEDBACK_BYTES = 64 * 1024 * 1024;

export interface ErrorFeedbackOptions {
  /** The most bytes of residuals kept (the stream being encoded is always kept). */
  maxBytes?: number;
  /** A bound shared with other ErrorFeedbacks (e.g. a tenant's sessions on one node). */
  ledger?: FeedbackLedger;
}

/**
 * A bound on the residuals of several ErrorFeedbacks together: past `maxBytes`, the least
 * recently used stream of any of them is given up (it restarts with no residual), never the
 * stream being encoded.
 */
export class FeedbackLedger {
  /** By feedback and stream, in order of use, the least recent first. */
  readonly #entries = new Map<string, { feedback: ErrorFeedback; stream: string; bytes: number }>();
  #bytes = 0;

  constructor(readonly maxBytes: number) {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', { field: 'maxBytes', reason: `must be a non-negative integer, got ${maxBytes}` });
  }

  /** Bytes of the residuals kept, all feedbacks together. */
  get bytes(): number {
    return this.#bytes;
  }

  /** `feedback` now keeps `bytes` on `stream` (its most recent use); gives up others past the bound. */
  kept(key: string, feedback: ErrorFeedback, stream: string, bytes: number): void {
    this.released(key);
    this.#entries.set(key, { feedback, stream, bytes });
    this.#bytes += bytes;
    for (const [oldest, e] of this.#entries) {
      if (this.#bytes <= this.maxBytes || oldest === key) break;
      this.#entries.delete(oldest);
      this.#bytes -= e.bytes;
      e.feedback.reset(e.stream);
    }
  }

  released(key: string): void {
    const e = this.#entries.get(key);
    if (e === undefined) return;
    this.#entries.delete(key);
    this.#bytes -= e.bytes;
  }
}

let feedbackIds = 0;

export class ErrorFeedback {
  readonly #spec: CodecSpec;
  /** In order of use, the least recent first. */
  readonly #residuals = new Map<string, Float32Array>();
  readonly #maxBytes: number;
  readonly #ledger: FeedbackLedger | undefined;
  /** This feedback's streams' prefix in the ledger. */
  readonly #id = `${++feedbackIds}/`;
  #bytes = 0;

  constructor(spec: CodecSpec, options: ErrorFeedbackOptions = {}) {
    this.#spec = spec;
    this.#maxBytes = options.maxBytes ?? DEFAULT_FEEDBACK_BYTES;
    this.#ledger = options.ledger;
  }

  /** Encodes `data` plus the stream's residual, and keeps the new residual. `data` is not modified. */
  encode(stream: string, data: Float32Array, shape: readonly number[], options: EncodeTensorOptions = {}): TensorFrame {
    let residual = this.#residuals.get(stream);
    if (residual !== undefined && residual.length !== data.length) {
      throw new ProtocolError('TANDEM_PROTO_INPUT_INVALID', {
        field: 'data',
        reason: `stream ${stream} carried ${residual.length} elements and now ${data.length}; reset() it first`,
      });
    }
    residual ??= new Float32Array(data.length);
    const corrected = new Float32Array(data.length);
    for (let i = 0; i < data.length; i++) corrected[i] = data[i] + residual[i];
    const frame = encodeTensor(corrected, shape, this.#spec, options);
    const decoded = new Float32Array(data.length);
    CODECS[frame.codec].decodeInto(frame, decoded, stream);
    for (let i = 0; i < data.length; i++) residual[i] = corrected[i] - decoded[i];
    this.reset(stream);
    this.#residuals.set(stream, residual);
    this.#bytes += residual.byteLength;
    for (const [oldest] of this.#residuals) {
      if (this.#bytes <= this.#maxBytes || oldest === stream) break;
      this.reset(oldest);
    }
    this.#ledger?.kept(this.#id + stream, this, stream, residual.byteLength);
    return frame;
  }

  /** The residual the next encode on `stream` will add, if any. */
  residual(stream: string): Float32Array | undefined {
    return this.#residuals.get(stream);
  }

  reset(stream: string): void {
    const residual = this.#residuals.get(stream);
    if (residual === undefined) return;
    this.#residuals.delete(stream);
    this.#bytes -= residual.byteLength;
    this.#ledger?.released(this.#id + stream);
  }

  /** Drop every stream, e.g. when the session closes (and give their bytes back to the ledger). */
  clear(): void {
    for (const stream of [...this.#residuals.keys()]) this.reset(stream);
  }

  get streams(): number {
    return this.#residuals.size;
  }

  /** Bytes of the residuals kept. */
  get bytes(): number {
    return this.#bytes;
  }
}
