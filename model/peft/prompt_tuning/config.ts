import type { ConfigOf } from '../fields.ts';
import { configError, int, neutral, oneOf, optionalString, readJson, readSpec, unwritten, writeJson } from '../fields.ts';

/** Prompt tuning's fields with PEFT's names (peft/tuners/prompt_tuning/config.py). */
export const PROMPT_TUNING_FIELDS = {
  numVirtualTokens: int('num_virtual_tokens', { min: 1 }),
  /** RANDOM: N(0, 1) like torch's nn.Embedding; TEXT: the embeddings of initTokenIds; SAMPLE_VOCAB: of random vocabulary tokens. */
  promptTuningInit: oneOf('prompt_tuning_init', ['RANDOM', 'TEXT', 'SAMPLE_VOCAB'], 'RANDOM'),
  /** Required with TEXT (PEFT requires it); Tandem initializes from initTokenIds, the tokenized text. */
  promptTuningInitText: optionalString('prompt_tuning_init_text'),
  tokenizerNameOrPath: optionalString('tokenizer_name_or_path'),
  /** The hidden size; filled from the model when absent (PEFT does the same). */
  tokenDim: { json: 'token_dim', read: (v: unknown, at: { field: string; file?: string }) => (v === undefined || v === null ? null : int('token_dim', { min: 1 }).read(v, at)) },
  numTransformerSubmodules: neutral('num_transformer_submodules', 1, 'a causal LM has one transformer submodule; set it to 1'),
  // PromptLearningConfig knows modules_to_save only from PEFT 0.17: read, never written.
  modulesToSave: unwritten(neutral('modules_to_save', null, 'set modules_to_save to null')),
};

/** PEFT fields outside the table that change nothing once the prompt is loaded: PromptLearningConfig's model description and the TEXT init's tokenizer options. */
export const PROMPT_TUNING_INERT_FIELDS = ['num_attention_heads', 'num_layers', 'tokenizer_kwargs'];

export type PromptTuningConfig = ConfigOf<typeof PROMPT_TUNING_FIELDS> & {
  /** Token ids whose embeddings initialize the prompt (TEXT); not saved: the prompt is. */
  initTokenIds: number[] | null;
};

export function promptTuningConfigFromSpec(spec: Readonly<Record<string, unknown>>): PromptTuningConfig {
  const { initTokenIds, ...rest } = spec;
  const c = { ...readSpec(PROMPT_TUNING_FIELDS, rest, 'prompt_tuning'), initTokenIds: null as number[] | null };
  if (initTokenIds !== undefined) {
    if (!Array.isArray(initTokenIds) || initTokenIds.length === 0 || initTokenIds.some((t) => !Number.isInteger(t) || t < 0)) {
      throw configError({ field: 'initTokenIds' }, 'must be a non-empty list of token ids (the tokenized prompt_tuning_init_text)');
    }
    c.initTokenIds = [...initTokenIds] as number[];
  }
  if (c.promptTuningInit === 'TEXT') {
    if (c.initTokenIds === null) throw configError({ field: 'initTokenIds' }, 'is required when promptTuningInit is TEXT: tokenize promptTuningInitText and pass the ids');
    // PEFT's PromptTuningConfig refuses TEXT without both (a file without them does not load in PEFT).
    if (!c.promptTuningInitText) throw configError({ field: 'promptTuningInitText' }, 'is required when promptTuningInit is TEXT: the text initTokenIds were tokenized from');
    if (!c.tokenizerNameOrPath) throw configError({ field: 'tokenizerNameOrPath' }, 'is required when promptTuningInit is TEXT: the tokenizer (a Hugging Face id or folder) that tokenized promptTuningInitText');
  }
  return c;
}

export function promptTuningConfigFromJson(json: Readonly<Record<string, unknown>>, file: string): PromptTuningConfig {
  return { ...readJson(PROMPT_TUNING_FIELDS, json, file, PROMPT_TUNING_INERT_FIELDS), initTokenIds: null };
}

export function promptTuningConfigToJson(c: PromptTuningConfig): Record<string, unknown> {
  return { peft_type: 'PROMPT_TUNING', ...writeJson(PROMPT_TUNING_FIELDS, c) };
}
