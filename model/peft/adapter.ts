import type { tf } from '../backend.ts';
import type { ForwardHooks } from '../hooks.ts';

/**
 * The contract between PEFT methods and everything that trains or serves them (the local
 * training loop, the split edge client, the cloud's plug-in evaluation).
 *
 * An Adapter is one or more PEFT methods instantiated on a model. It changes the forward pass
 * only through `hooks` (and by marking some base weights trainable, for `block` and BitFit).
 */
export interface Adapter {
  /** The hooks to pass in ForwardOptions; compose every method of this adapter. */
  readonly hooks: ForwardHooks;
  /** Virtual tokens prepended to every sequence (prompt tuning), 0 otherwise. */
  readonly numVirtualTokens: number;
  /** Variables the optimizer updates, keyed by their on-disk (PEFT) tensor names. */
  trainableVariables(): Map<string, tf.Variable>;
  /**
   * Turns raw gradients (by key, after clipping) into those the optimizer applies, in place:
   * LoRA-FA projects B's gradient as PEFT's LoRA-FA optimizer does. Call it just before the
   * optimizer step; absent or a no-op for methods whose raw gradients are applied.
   */
  projectGradients?(grads: Map<string, tf.Tensor>): void;
  /** Folds the adapter into the base weights where every method allows it; throws a typed error otherwise. */
  merge(): void;
  /** Undoes merge() exactly (within float tolerance). */
  unmerge(): void;
  readonly merged: boolean;
  /** Frees the adapter's own variables (and restores base weights it made trainable). */
  dispose(): void;
}
