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
}

export class ErrorFeedback {
  readonly #spec: CodecSpec;
  /** In order of use, the least recent first. */
  readonly #residuals = new Map<string, Float32Array>();
  readonly #maxBytes: number;
  #bytes = 0;

  constructor(spec: CodecSpec, options: ErrorFeedbackOptions = {}) {
    this.#spec = spec;
    this.#maxBytes = options.maxBytes ?? DEFAULT_FEEDBACK_BYTES;
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
    for (const [oldest, r] of this.#residuals) {
      if (this.#bytes <= this.#maxBytes || oldest === stream) break;
      this.#residuals.delete(oldest);
      this.#bytes -= r.byteLength;
    }
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
  }

  /** Drop every stream, e.g. when the session closes. */
  clear(): void {
    this.#residuals.clear();
    this.#bytes = 0;
  }

  get streams(): number {
    return this.#residuals.size;
  }

  /** Bytes of the residuals kept. */
  get bytes(): number {
    return this.#bytes;
  }
}
