// The frozen middle on ONNX Runtime, in the two shapes its callers use: the Middle interface of
// the training loop (local training, offsite mode) and the executor shape of cloud-node
// (forward, forward keeping what backward needs, VJP from what was kept, VJP by recomputing
// from h_B after an eviction or a restart).
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { Middle, MicrobatchKey } from '../train/middle.ts';
import type { KeptForward, OrtLlama } from './ort-llama.ts';

export type Shape3 = [number, number, number];

export interface BlockRange {
  start: number;
  end: number;
}

/** cloud-node's MiddleExecutor with the blocks on ORT; `KeptForward` replaces the tfjs tape. */
export class OrtMiddleExecutor {
  constructor(readonly engine: OrtLlama) {}

  /** h_B [batch, seq, hidden] → h_M. */
  forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array> {
    return this.engine.blocks(h, shape[0], shape[1], range.start, range.end);
  }

  /** h_B → h_M, keeping the saved tensors so backwardFromKept needs no recomputation. */
  async forwardKeeping(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; kept: KeptForward }> {
    const kept = await this.engine.blocksKeep(h, shape[0], shape[1], range.start, range.end);
    return { output: kept.output, kept };
  }

  /** g_M → g_B from what forwardKeeping kept (which this frees). */
  backwardFromKept(kept: KeptForward, g: Float32Array): Promise<Float32Array> {
    return kept.vjp(g);
  }

  /** g_M → g_B by recomputing the forward from h_B, in one graph. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    return (await this.engine.blocksRecomputeBackward(h, g, shape[0], shape[1], range.start, range.end)).dx;
  }
}

const keyString = (key: MicrobatchKey): string => `${key.eval ? 'eval' : 'train'}:${key.step}:${key.microbatch}`;

/**
 * Blocks [start, end) of a frozen model on ORT behind the training loop's Middle interface.
 * Forward keeps the saved tensors for the micro-batch's backward when one follows; it holds no trainable
 * parameters (LoRA on the middle stays with tfjs's LocalMiddle).
 */
export class OrtMiddle implements Middle {
  readonly trainsParameters = false;
  private readonly kept = new Map<string, KeptForward>();

  constructor(
    private readonly engine: OrtLlama,
    readonly start: number,
    readonly end: number,
  ) {
    const L = engine.config.numHiddenLayers;
    if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end > L || start > end) {
      throw new ModelError('TANDEM_INPUT_INVALID', `block range [${start}, ${end}) is outside [0, ${L}]`, { field: 'blocks' });
    }
  }

  async forward(h: tf.Tensor3D, key: MicrobatchKey, backward = !key.eval): Promise<tf.Tensor3D> {
    const [b, s, d] = h.shape;
    const data = (await h.data()) as Float32Array;
    if (this.start === this.end) return tf.tensor3d(data, [b, s, d]);
    if (key.eval || !backward) return tf.tensor3d(await this.engine.blocks(data, b, s, this.start, this.end), [b, s, d]);
    const k = keyString(key);
    this.kept.get(k)?.dispose();
    const kept = await this.engine.blocksKeep(data, b, s, this.start, this.end);
    this.kept.set(k, kept);
    return tf.tensor3d(kept.output, [b, s, d]);
  }

  async backward(g: tf.Tensor3D, key: MicrobatchKey): Promise<tf.Tensor3D> {
    const [b, s, d] = g.shape;
    const data = (await g.data()) as Float32Array;
    if (this.start === this.end) return tf.tensor3d(data, [b, s, d]);
    const k = keyString(key);
    const kept = this.kept.get(k);
    if (!kept) throw new ModelError('TANDEM_INPUT_INVALID', `no forward was kept for micro-batch ${k}`, { field: 'microbatch' });
    this.kept.delete(k);
    return tf.tensor3d(await kept.vjp(data), [b, s, d]);
  }

  release(key: MicrobatchKey): void {
    const k = keyString(key);
    this.kept.get(k)?.dispose();
    this.kept.delete(k);
  }

  dispose(): void {
    for (const k of this.kept.values()) k.dispose();
    this.kept.clear();
  }
}
