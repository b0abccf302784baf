import type { tf } from '../backend.ts';
import type { ForwardHooks } from '../hooks.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { Rng } from '../random.ts';

/** One tensor of an adapter's state under its on-disk key (PEFT's name where PEFT has the method). */
export interface AdapterTensor {
  key: string;
  variable: tf.Variable;
  /** False for state that is saved but never updated (LoRA-FA's A, VeRA's shared projections). */
  trainable: boolean;
}

export interface CreateContext {
  /** This method's own generator: initialization, then dropout masks while training. */
  rng: Rng;
  /** The values are about to be loaded from a file: initialization that needs more input (text-initialized prompts) is skipped. */
  fromFile: boolean;
}

/** A tensor a method would create (or copy), known from its configuration and the model's shapes alone. */
export interface DeclaredTensor {
  /** The on-disk key, as in AdapterTensor. */
  key: string;
  shape: readonly number[];
}

export interface DeclareContext {
  /** The adapter_config.json the configuration came from: errors then name fields by PEFT's names and name the file. */
  file?: string;
}

/** One PEFT method instantiated on a model. */
export interface MethodInstance {
  readonly hooks: ForwardHooks;
  readonly numVirtualTokens: number;
  /** Everything the method saves, derived from its declared state names; never listed by hand. */
  readonly state: readonly AdapterTensor[];
  /**
   * What the method changes, as dotted names (a module path, a weight name, a layer prefix).
   * Two methods of one adapter may not claim the same thing or one inside the other.
   */
  readonly claims: readonly string[];
  /** Why merge is impossible, or undefined when it is possible. */
  readonly mergeBlocker?: string;
  merge(): void;
  unmerge(): void;
  dispose(): void;
  /**
   * Replaces the gradients of this method's state (by key) with what its optimizer would apply
   * (LoRA-FA's projection of B's gradient); absent when the raw gradients are applied.
   */
  projectGradients?(grads: Map<string, tf.Tensor>): void;
}

/**
 * A PEFT method as the registry holds it. `C` is its validated configuration in camelCase;
 * on disk the configuration uses PEFT's snake_case field names.
 */
export interface PeftMethod<C = unknown> {
  /** Registry name, used in MethodSpec.method, e.g. 'lora'. */
  readonly name: string;
  /** adapter_config.json's peft_type: PEFT's own where PEFT has the method, TANDEM_* otherwise. */
  readonly peftType: string;
  /** Validates a camelCase spec (the `method` key excluded); throws TANDEM_PEFT_CONFIG_INVALID naming the field. */
  fromSpec(spec: Readonly<Record<string, unknown>>): C;
  /** Validates the method's fields of adapter_config.json; throws TANDEM_PEFT_CONFIG_INVALID naming the file and field. */
  fromJson(json: Readonly<Record<string, unknown>>, file: string): C;
  /** The method's fields of adapter_config.json, in PEFT's names (peft_type included). */
  toJson(config: C): Record<string, unknown>;
  /**
   * The tensors `create` would make for this model, in the same keys and shapes, computed from
   * the configuration and the model's weight shapes alone: nothing is allocated. It also checks
   * every size the configuration states against the model (a rank no larger than the widest
   * layer it targets, ...), throwing TANDEM_PEFT_CONFIG_INVALID naming the field and the limit.
   * Loading and creating an adapter call it first: its bytes are estimated from it and a file's
   * header is compared with it before `create` runs.
   */
  declare(model: LlamaModel, config: C, ctx: DeclareContext): DeclaredTensor[];
  create(model: LlamaModel, config: C, ctx: CreateContext): MethodInstance;
  /**
   * Positions the method prepends to every sequence (its instance's numVirtualTokens), from the
   * configuration alone, so a run's sequence length is checked before any model is at hand.
   * Absent: none.
   */
  virtualTokens?(config: C): number;
}
