// Methods that train some of the base model's own weights (BitFit, whole blocks): no hooks,
// the weights are marked trainable and restored when the adapter is disposed.
import type { tf } from '../backend.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { AdapterTensor, MethodInstance } from './method.ts';
import { keepCopy } from './ops.ts';

export class TrainableWeights implements MethodInstance {
  readonly numVirtualTokens = 0;
  readonly hooks = {};
  readonly state: AdapterTensor[];
  private readonly originals: { variable: tf.Variable; value: tf.Tensor }[];

  /** `weights`: base weight name → on-disk key. */
  constructor(
    model: LlamaModel,
    weights: ReadonlyMap<string, string>,
    readonly claims: readonly string[],
  ) {
    this.state = [...weights].map(([name, key]) => ({ key, variable: model.weight(name), trainable: true }));
    this.originals = this.state.map((s) => ({ variable: s.variable, value: keepCopy(s.variable) }));
    for (const s of this.state) s.variable.trainable = true;
  }

  // The trained values are the weights themselves: merged from the start.
  merge(): void {}
  unmerge(): void {}

  /** Restores the base values and freezes the weights again. */
  dispose(): void {
    for (const { variable, value } of this.originals) {
      variable.assign(value);
      variable.trainable = false;
      value.dispose();
    }
    this.originals.length = 0;
  }
}
