// The cloud's half of split inference: per session, the middle blocks' KV cache of one
// sequence. Each InferStep runs the middle on the new tokens' h_B at the next position and
// returns their h_M; what the cache holds is counted against a per-session and a node-wide
// budget before it grows, and an InferEnd, a SessionClose or the session's expiry frees it.
// The last step's h_B and h_M are kept with the cache: the edge's connection resends a request
// whose reply it did not get, and that resend is answered with the same h_M, not run again
// (which would append its keys and values to the cache a second time).
import { KvCache, kvBytesPerToken, tf } from '../../model/index.ts';
import { ProtocolError } from '../../protocol/index.ts';
import type { ServedModel } from '../served-model.ts';

export interface SplitInferenceLimits {
  /** Bytes of middle KV cache one session may hold (32 MiB). */
  perSessionBytes: number;
  /** Bytes all sessions may hold together (256 MiB). */
  totalBytes: number;
}

export const DEFAULT_SPLIT_INFERENCE_LIMITS: Readonly<SplitInferenceLimits> = { perSessionBytes: 32 * 1024 * 1024, totalBytes: 256 * 1024 * 1024 };

interface Sequence {
  cache: KvCache;
  positions: number;
  /** The cache's bytes and the last step's. */
  bytes: number;
  last?: { position: number; input: Float32Array; output: Float32Array };
}

function sameValues(a: Float32Array, b: Float32Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

export class SplitInference {
  readonly #limits: SplitInferenceLimits;
  readonly #sequences = new Map<string, Sequence>();
  #bytes = 0;
  readonly #onBytes: (bytes: number) => void;

  constructor(limits: Partial<SplitInferenceLimits> = {}, onBytes: (bytes: number) => void = () => {}) {
    this.#limits = { ...DEFAULT_SPLIT_INFERENCE_LIMITS, ...limits };
    this.#onBytes = onBytes;
  }

  get bytes(): number {
    return this.#bytes;
  }

  /** Middle blocks [start, end) on h_B [1, tokens, hidden] at `position`; returns h_M. */
  step(served: ServedModel, range: { start: number; end: number }, sessionId: string, position: number, h: Float32Array, shape: readonly [number, number, number]): Float32Array {
    const held = this.#sequences.get(sessionId)?.last;
    if (held !== undefined && held.position === position && sameValues(held.input, h)) return held.output.slice();
    if (position === 0) this.end(sessionId);
    const seq = this.#sequences.get(sessionId) ?? { cache: new KvCache(), positions: 0, bytes: 0 };
    if (position !== seq.positions) throw new ProtocolError('TANDEM_PROTO_INFER_POSITION_INVALID', { session: sessionId, actual: position, expected: seq.positions });
    if (shape[0] !== 1) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'infer_step.frames[0] (h_B)', reason: `batch ${shape[0]}: split inference runs one sequence, batch 1` });
    const reach = position + shape[1];
    const context = served.config.maxPositionEmbeddings;
    if (reach > context) throw new ProtocolError('TANDEM_PROTO_INFER_CONTEXT_EXCEEDED', { actual: reach, limit: context });
    const blocks = range.end - range.start;
    const bytes = reach * (kvBytesPerToken(served.model) / served.numLayers) * blocks + 2 * h.byteLength;
    if (bytes > this.#limits.perSessionBytes) throw new ProtocolError('TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED', { session: sessionId, actual: bytes, limit: this.#limits.perSessionBytes });
    if (this.#bytes - seq.bytes + bytes > this.#limits.totalBytes) throw new ProtocolError('TANDEM_PROTO_INFER_KV_BUDGET_EXCEEDED', { session: sessionId, actual: this.#bytes - seq.bytes + bytes, limit: `${this.#limits.totalBytes} (all sessions)` });
    const out = tf.tidy(() => served.model.blocks(tf.tensor3d(h, [1, shape[1], shape[2]]), range.start, range.end, { cache: seq.cache, positionOffset: position }));
    const data = out.dataSync() as Float32Array;
    out.dispose();
    seq.positions = reach;
    seq.last = { position, input: h.slice(), output: data.slice() };
    this.#bytes += bytes - seq.bytes;
    seq.bytes = bytes;
    this.#sequences.set(sessionId, seq);
    this.#onBytes(this.#bytes);
    return data;
  }

  /** Frees the session's cache (nothing when it has none). */
  end(sessionId: string): void {
    const seq = this.#sequences.get(sessionId);
    if (seq === undefined) return;
    seq.cache.dispose();
    this.#bytes -= seq.bytes;
    this.#sequences.delete(sessionId);
    this.#onBytes(this.#bytes);
  }

  clear(): void {
    for (const id of [...this.#sequences.keys()]) this.end(id);
  }
}
