// Tokenizers of Hugging Face model folders (tokenizer.json + tokenizer_config.json), run
// offline with @huggingface/tokenizers: nothing is fetched.
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ModelError } from './errors.ts';
import { readModelFile } from './safetensors.ts';

export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';

export interface EncodeOptions {
  /** Add the special tokens the tokenizer's post-processor defines (BOS for Llama). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave out special tokens such as <s> and </s>. Default false. */
  skipSpecialTokens?: boolean;
}

export interface Tokenizer {
  /** The tokenizer.json it was loaded from. */
  readonly path: string;
  readonly vocabSize: number;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
  /**
   * The longest token's spelling in the vocabulary, in UTF-16 units: a token covers at most
   * this many characters of normalized text (a byte-level token's spelling has a character
   * per byte), so a text longer than context × this has more tokens than the context holds.
   */
  readonly maxTokenChars: number;
  encode(text: string, options?: EncodeOptions): number[];
  /** Ids outside [0, vocabSize) are TANDEM_INPUT_INVALID. */
  decode(ids: readonly number[], options?: DecodeOptions): string;
}

async function readJson(path: string): Promise<unknown> {
  const text = Buffer.from(await readModelFile(path)).toString('utf8');
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw new ModelError('TANDEM_TOKENIZER_INVALID', `the file is not valid JSON: ${(cause as Error).message}`, { file: path, cause });
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** tokenizer_config.json spells special tokens as a string or as an AddedToken object. */
function tokenContent(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (isObject(v) && typeof v.content === 'string') return v.content;
  return undefined;
}

/**
 * Loads the tokenizer of a model folder. tokenizer.json is required; tokenizer_config.json
 * is optional and supplies the BOS/EOS tokens (when it is absent they come from the
 * `<s>`/`</s>` conventions only if those tokens exist).
 */
export async function loadTokenizer(dir: string): Promise<Tokenizer> {
  const path = join(dir, 'tokenizer.json');
  const configPath = join(dir, TOKENIZER_CONFIG_FILE);
  const json = await readJson(path);
  if (!isObject(json) || !isObject(json.model)) {
    throw new ModelError('TANDEM_TOKENIZER_INVALID', 'tokenizer.json must be an object with a "model" object', { file: path });
  }
  let config: Record<string, unknown> = {};
  const hasConfig = await stat(configPath).then(
    (s) => s.isFile(),
    () => false,
  );
  if (hasConfig) {
    const raw = await readJson(configPath);
    if (!isObject(raw)) throw new ModelError('TANDEM_TOKENIZER_INVALID', 'tokenizer_config.json must hold a JSON object', { file: configPath });
    config = raw;
  }
  let hf: HfTokenizer;
  try {
    hf = new HfTokenizer(json, config);
  } catch (cause) {
    throw new ModelError('TANDEM_TOKENIZER_INVALID', `the tokenizer could not be built: ${(cause as Error).message}`, { file: path, cause });
  }
  const vocab = hf.get_vocab(true);
  const vocabSize = Math.max(-1, ...vocab.values()) + 1;
  let maxTokenChars = 1;
  for (const spelling of vocab.keys()) maxTokenChars = Math.max(maxTokenChars, spelling.length);
  const idOf = (key: string, fallback: string): number | undefined => {
    const content = tokenContent(config[key]) ?? (hasConfig ? undefined : fallback);
    return content === undefined ? undefined : hf.token_to_id(content);
  };
  const bosTokenId = idOf('bos_token', '<s>');
  const eosTokenId = idOf('eos_token', '</s>');

  return {
    path,
    vocabSize,
    bosTokenId,
    eosTokenId,
    maxTokenChars,
    encode(text: string, options: EncodeOptions = {}): number[] {
      if (typeof text !== 'string') throw new ModelError('TANDEM_INPUT_INVALID', 'text to encode must be a string', { file: path });
      return hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
    },
    decode(ids: readonly number[], options: DecodeOptions = {}): string {
      for (const id of ids) {
        if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
          throw new ModelError('TANDEM_INPUT_INVALID', `token id ${id} is outside the vocabulary [0, ${vocabSize})`, { file: path });
        }
      }
      return hf.decode([...ids], { skip_special_tokens: options.skipSpecialTokens ?? false });
    },
  };
}
