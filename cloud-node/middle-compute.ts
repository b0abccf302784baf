// Runs the frozen middle blocks [B, L-T) of a model in this thread: forward, and the
// vector-Jacobian product g_B = (d middle / d h_B)^T g_M, either from the tape the forward
// kept or by recomputing the forward from h_B (after an eviction or a restart). The node
// runs it inside its compute workers (middle-worker.ts), never on its event loop. Two
// implementations of one interface: tfjs (MiddleCompute) and ONNX Runtime (OrtMiddleCompute).
import { OrtMiddleExecutor, gradients, tapedForward, tf } from '../model/index.ts';
import type { KeptForward, LlamaModel, OrtLlama, TapedForward } from '../model/index.ts';

export type Shape3 = [number, number, number];

export interface BlockRange {
  start: number;
  end: number;
}

/** What a forward kept for its backward (a tfjs tape or ORT's saved tensors). */
export interface Kept {
  readonly savedBytes: number;
  dispose(): void;
}

/** The middle's computations, whatever runs them. */
export interface Compute<K extends Kept = Kept> {
  forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array>;
  forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: K }>;
  backwardFromTape(tape: K, g: Float32Array, shape: Shape3): Promise<Float32Array>;
  backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array>;
}

/** The middle on ONNX Runtime: the same four operations, the saved tensors kept in place of a tape. */
export class OrtMiddleCompute implements Compute<KeptForward> {
  readonly #exec: OrtMiddleExecutor;

  constructor(engine: OrtLlama) {
    this.#exec = new OrtMiddleExecutor(engine);
  }

  forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array> {
    return this.#exec.forward(range, h, shape);
  }

  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: KeptForward }> {
    const { output, kept } = await this.#exec.forwardKeeping(range, h, shape);
    return { output, tape: kept };
  }

  backwardFromTape(tape: KeptForward, g: Float32Array): Promise<Float32Array> {
    return this.#exec.backwardFromKept(tape, g);
  }

  backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    return this.#exec.backward(range, h, g, shape);
  }
}

export class MiddleCompute implements Compute<TapedForward> {
  readonly #model: LlamaModel;

  constructor(model: LlamaModel) {
    this.#model = model;
  }

  /** h_B [batch, seq, hidden] → h_M. */
  async forward(range: BlockRange, h: Float32Array, shape: Shape3): Promise<Float32Array> {
    const out = tf.tidy(() => this.#model.blocks(tf.tensor3d(h, shape), range.start, range.end));
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }

  /** h_B → h_M, keeping the forward's tape so that backwardFromTape needs no recomputation. */
  async forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3): Promise<{ output: Float32Array; tape: TapedForward }> {
    const input = tf.tensor3d(h, shape);
    let tape: TapedForward;
    try {
      tape = tapedForward(() => this.#model.blocks(input, range.start, range.end), [input]);
    } finally {
      input.dispose();
    }
    try {
      return { output: (await tape.output.data()) as Float32Array, tape };
    } catch (err) {
      tape.dispose();
      throw err;
    }
  }

  /** g_M → g_B from a kept tape (which this frees). */
  async backwardFromTape(tape: TapedForward, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    const dy = tf.tensor3d(g, shape);
    let out: tf.Tensor;
    try {
      [out] = tape.vjp(dy);
    } finally {
      dy.dispose();
    }
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }

  /** g_M (same shape as h_B) → g_B. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    const out = tf.tidy(() => {
      const x = tf.tensor3d(h, shape);
      const { grads } = gradients(() => this.#model.blocks(x, range.start, range.end), [x], tf.tensor3d(g, shape));
      return grads[0] ?? tf.zerosLike(x);
    });
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }
}
