import { tf } from '../../backend.ts';
import type { ForwardHooks, HookContext } from '../../hooks.ts';
import type { LlamaModel } from '../../llama/llama.ts';
import { checkAtMost, configError, fieldAt } from '../fields.ts';
import type { AdapterTensor, CreateContext, DeclareContext, DeclaredTensor, MethodInstance } from '../method.ts';
import { normalValues, variableFrom } from '../ops.ts';
import type { PromptTuningConfig } from './config.ts';

/** Prompt tuning's state by PEFT's name: prompt_embeddings [num_virtual_tokens, hidden], saved without any prefix. */
export const PROMPT_TUNING_STATE = { prompt: 'prompt_embeddings' } as const;

/**
 * The prompt PromptTuning creates, from the configuration and the model's shapes alone. The
 * virtual tokens are positions of every sequence, so there may be at most as many as the
 * model's context (max_position_embeddings); PEFT's adapters use tens to hundreds.
 */
export function declarePromptTuning(model: LlamaModel, config: PromptTuningConfig, ctx: DeclareContext): DeclaredTensor[] {
  const embed = model.weights.get('model.embed_tokens.weight');
  if (!embed) throw configError({ field: 'method', file: ctx.file }, 'prompt_tuning needs the token embedding: create it on the model part that holds model.embed_tokens.weight (the bottom)');
  const hidden = embed.shape[1] as number;
  if (config.tokenDim !== null && config.tokenDim !== hidden) throw configError(fieldAt(ctx.file, 'token_dim', 'tokenDim'), `is ${config.tokenDim} but the model's hidden size is ${hidden}`);
  const context = model.config.maxPositionEmbeddings;
  checkAtMost(fieldAt(ctx.file, 'num_virtual_tokens', 'numVirtualTokens'), config.numVirtualTokens, context, "the model's context, max_position_embeddings: every sequence starts with the virtual tokens");
  return [{ key: PROMPT_TUNING_STATE.prompt, shape: [config.numVirtualTokens, hidden] }];
}

export class PromptTuning implements MethodInstance {
  readonly state: AdapterTensor[];
  readonly claims = [];
  readonly hooks: ForwardHooks;
  readonly numVirtualTokens: number;
  readonly mergeBlocker = 'a soft prompt adds tokens and cannot be folded into weights';
  private readonly prompt: tf.Variable;

  constructor(model: LlamaModel, config: PromptTuningConfig, ctx: CreateContext) {
    const embed = model.weights.get('model.embed_tokens.weight');
    if (!embed) throw configError({ field: 'method' }, 'prompt_tuning needs the token embedding: create it on the model part that holds model.embed_tokens.weight (the bottom)');
    const [vocab, hidden] = embed.shape;
    if (config.tokenDim !== null && config.tokenDim !== hidden) throw configError({ field: 'token_dim' }, `is ${config.tokenDim} but the model's hidden size is ${hidden}`);
    const n = config.numVirtualTokens;
    this.numVirtualTokens = n;
    if (config.promptTuningInit === 'RANDOM' || ctx.fromFile) {
      this.prompt = variableFrom(normalValues(ctx.rng, n * hidden, 1), [n, hidden], true);
    } else {
      // PEFT: the text's ids repeated to fill the prompt, then cut to its length; or random vocabulary ids.
      let ids: number[];
      if (config.promptTuningInit === 'TEXT') {
        const text = config.initTokenIds as number[];
        ids = Array.from({ length: n }, (_, i) => text[i % text.length]);
        const bad = ids.find((t) => t >= vocab);
        if (bad !== undefined) throw configError({ field: 'initTokenIds' }, `holds token ${bad}, outside the vocabulary of ${vocab}`);
      } else {
        ids = Array.from({ length: n }, () => ctx.rng.int(vocab));
      }
      this.prompt = tf.tidy(() => tf.variable(tf.gather(embed, tf.tensor1d(ids, 'int32')), true));
    }
    this.state = [{ key: PROMPT_TUNING_STATE.prompt, variable: this.prompt, trainable: true }];
    this.hooks = { embeddings: (h, hookCtx) => this.embeddings(h, hookCtx) };
  }

  private embeddings(h: tf.Tensor3D, ctx: HookContext): tf.Tensor3D {
    // With a KV cache the virtual tokens are already in it after the first call.
    if (ctx.pastLength > 0) return h;
    const [b] = h.shape;
    const prompt = tf.tile(tf.expandDims(this.prompt, 0), [b, 1, 1]);
    return tf.concat([prompt, h], 1) as tf.Tensor3D;
  }

  merge(): void {
    throw new Error('unreachable: the adapter checks mergeBlocker first');
  }

  unmerge(): void {}

  dispose(): void {
    this.prompt.dispose();
  }
}
