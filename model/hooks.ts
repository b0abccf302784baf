import type { tf } from './backend.ts';

/** The projections of a LLaMA-family block, by their Hugging Face module names. */
export const LINEAR_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LinearModuleName = (typeof LINEAR_MODULES)[number];

/** One linear projection as the forward pass sees it. */
export interface LinearModule {
  /** Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`. */
  path: string;
  layer: number;
  name: LinearModuleName;
  weight: tf.Tensor2D;
  bias?: tf.Tensor1D;
  inFeatures: number;
  outFeatures: number;
}

export type SublayerKind = 'attention' | 'mlp';

/**
 * The closed list of points where a PEFT method changes the forward pass. A method that
 * needs none of them (whole trainable blocks, BitFit) only marks weights trainable.
 */
export interface ForwardHooks {
  /** Replaces y = x W^T + b for one projection; `base` computes the frozen projection. x is [tokens, in]. */
  linear?(module: LinearModule, x: tf.Tensor2D, base: (x: tf.Tensor2D) => tf.Tensor2D, ctx: HookContext): tf.Tensor2D;
  /** Changes a sublayer's output (attention or MLP) before the residual add; `input` is the normed input. */
  sublayer?(layer: number, kind: SublayerKind, input: tf.Tensor3D, output: tf.Tensor3D, ctx: HookContext): tf.Tensor3D;
  /** Changes the token embeddings, [batch, seq, hidden]; may prepend virtual tokens (prompt tuning). */
  embeddings?(h: tf.Tensor3D, ctx: HookContext): tf.Tensor3D;
}

export interface HookContext {
  /** True while training: dropout is active. */
  training: boolean;
  /** Tokens already in the KV cache before this call (0 when there is none). */
  pastLength: number;
}

export const HOOK_NAMES = ['linear', 'sublayer', 'embeddings'] as const;
