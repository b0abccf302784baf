// Error feedback for lossy codecs: the sender keeps what the codec lost on each stream
// and adds it to the next tensor of that stream, so over a stream the sum of what was
// received tracks the sum of what was sent (the gap stays one residual, not a growing sum).
import { CODECS } from './codecs/registry.ts';
import { ProtocolError } from './errors.ts';
import type { CodecSpec, TensorFrame } from './messages.ts';
import { encodeTensor } from './tensor-frame.ts';
import type { EncodeTensorOptions } from './tensor-frame.ts';

export class ErrorFeedback {
  readonly #spec: CodecSpec;
  readonly #residuals = new Map<string, Float32Array>();

  constructor(spec: CodecSpec) {
    this.#spec = spec;
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
    this.#residuals.set(stream, residual);
    return frame;
  }

  /** The residual the next encode on `stream` will add, if any. */
  residual(stream: string): Float32Array | undefined {
    return this.#residuals.get(stream);
  }

  reset(stream: string): void {
    this.#residuals.delete(stream);
  }

  /** Drop every stream, e.g. when the session closes. */
  clear(): void {
    this.#residuals.clear();
  }

  get streams(): number {
    return this.#residuals.size;
  }
}
