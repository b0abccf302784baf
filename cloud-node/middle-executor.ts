// Runs the frozen middle blocks [B, L-T) of the served model: forward, and the
// vector-Jacobian product g_B = (d middle / d h_B)^T g_M, recomputing the forward from h_B.
import { tf } from '../model/index.ts';
import type { LlamaModel } from '../model/index.ts';

export type Shape3 = [number, number, number];

export interface BlockRange {
  start: number;
  end: number;
}

export class MiddleExecutor {
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

  /** g_M (same shape as h_B) → g_B. */
  async backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3): Promise<Float32Array> {
    const out = tf.tidy(() => {
      const middle = (x: tf.Tensor): tf.Tensor3D => this.#model.blocks(x as tf.Tensor3D, range.start, range.end);
      const [gradient] = tf.grads(middle)([tf.tensor3d(h, shape)], tf.tensor3d(g, shape));
      return gradient;
    });
    try {
      return (await out.data()) as Float32Array;
    } finally {
      out.dispose();
    }
  }
}
