import { tf } from '../backend.ts';
import type { LlamaModel } from '../llama/llama.ts';

/**
 * The base weights a method has folded its adapter into, with their originals: unmerging
 * puts the originals back, which is exact where subtracting the delta again would not be.
 */
export class MergedWeights {
  private readonly originals = new Map<string, tf.Tensor>();

  constructor(private readonly model: LlamaModel) {}

  get active(): boolean {
    return this.originals.size > 0;
  }

  /** Replaces the weight `name` by `merge(weight)`, keeping the original. */
  replace(name: string, merge: (weight: tf.Tensor) => tf.Tensor): void {
    const w = this.model.weight(name);
    if (!this.originals.has(name)) this.originals.set(name, tf.keep(tf.clone(w)));
    const merged = tf.tidy(() => merge(w));
    w.assign(merged);
    merged.dispose();
  }

  /** Puts every original back. */
  restore(): void {
    for (const [name, original] of this.originals) {
      this.model.weight(name).assign(original);
      original.dispose();
    }
    this.originals.clear();
  }
}
