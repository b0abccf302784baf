// Tokenizers of Hugging Face model folders (tokenizer.json + tokenizer_config.json), run
// offline with @huggingface/tokenizers: nothing is fetched.
import * as hfTokenizers from '@huggingface/tokenizers';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ModelError } from './errors.ts';
import { readModelFile } from './safetensors.ts';

export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';

/** The longest `pattern.Regex` / `pattern.String` a tokenizer.json may hold, in UTF-16 units. */
export const MAX_TOKENIZER_PATTERN_CHARS = 1024;
/** How deeply the normalizer, pre_tokenizer and decoder trees (Sequence in Sequence) may nest. */
export const MAX_TOKENIZER_NESTING = 64;

// The package's index.d.ts re-exports its normalizers by paths without an extension, which
// NodeNext resolution does not follow: the one used here is typed here.
const { ReplaceNormalizer } = hfTokenizers as unknown as {
  ReplaceNormalizer: new (config: { type: 'Replace'; pattern: { Regex: string }; content: string }) => { pattern: RegExp | null };
};

export interface EncodeOptions {
  /** Add the special tokens the tokenizer's post-processor defines (BOS for Llama). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave out special tokens such as <s> and </s>. Default false. */
  skipSpecialTokens?: boolean;
  /**
   * Leave out ids at or past the tokenizer's vocabulary instead of refusing them: a model may
   * have more embedding rows than its tokenizer has tokens (Qwen2: 151,936 and 151,665) and can
   * generate them; they have no text (Hugging Face's decode skips them). Default false.
   */
  skipOutOfVocabulary?: boolean;
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
  /** Ids outside [0, vocabSize) are TANDEM_INPUT_INVALID (unless skipOutOfVocabulary leaves out those >= vocabSize). */
  decode(ids: readonly number[], options?: DecodeOptions): string;
}

/** The largest tokenizer file read (Llama 3's tokenizer.json is 9 MB, Qwen2's 7 MB). */
const MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024;

async function readJson(path: string): Promise<unknown> {
  const text = Buffer.from(await readModelFile(path, MAX_TOKENIZER_FILE_BYTES)).toString('utf8');
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

function shown(pattern: string): string {
  return JSON.stringify(pattern.length > 80 ? `${pattern.slice(0, 80)}…` : pattern);
}

/**
 * Why a regular expression (JavaScript syntax, `u` flag: what the library compiles a
 * tokenizer.json pattern to) can backtrack catastrophically, or undefined when it cannot in
 * the ways refused here: a group repeated by `*`, `+`, `{n,}` or `{n,m}` (m > 1) whose body
 * holds a quantifier or an alternation, such as `(\w+\s?)+` or `(a|a)*` (exponential), and
 * back-references; and three or more unbounded repetitions in one alternative, such as
 * `a*a*a*b` (polynomial: twelve of them took 18 s on 25 characters). Pre-tokenizer regexes of
 * real models (GPT-2, Llama-3, Qwen2) have none of these: Llama-3's `\s*[\r\n]+` has two.
 */
function backtrackingHazard(source: string): string | undefined {
  const tooManyRepeats = (group: { start: number; end: number }, at: number): string =>
    `${shown(source.slice(group.start, group.end === source.length ? at : group.end))} repeats three or more parts without bound in one alternative (as compiled; their matches can split a run of characters in polynomially many ways)`;
  /**
   * `repeats`: the unbounded repetitions in the group's current alternative so far, those of the
   * groups inside it included (`(?:a*)(?:a*)(?:a*)b` is `a*a*a*b`); `most`: the largest over the
   * alternatives closed so far.
   */
  interface Group { quantified: boolean; alternation: boolean; repeats: number; most: number; start: number; end: number }
  const open: Group[] = [{ quantified: false, alternation: false, repeats: 0, most: 0, start: 0, end: source.length }];
  let previous: Group | undefined; // the group just closed, when the next token may quantify it
  let i = 0;
  while (i < source.length) {
    const c = source[i];
    const top = open[open.length - 1];
    if (c === '\\') {
      const n = source[i + 1] ?? '';
      if ((n >= '1' && n <= '9') || (n === 'k' && source[i + 2] === '<')) return 'a back-reference';
      const braced = 'pPux'.includes(n) && source[i + 2] === '{' ? source.indexOf('}', i + 3) : -1;
      i = braced >= 0 ? braced + 1 : i + 2;
      previous = undefined;
      continue;
    }
    if (c === '[') {
      // With the u flag classes do not nest and the first unescaped ] closes one ([] is empty).
      for (i++; i < source.length && source[i] !== ']'; i += source[i] === '\\' ? 2 : 1);
      i++;
      previous = undefined;
      continue;
    }
    if (c === '(') {
      const group: Group = { quantified: false, alternation: false, repeats: 0, most: 0, start: i, end: source.length };
      open.push(group);
      i++;
      if (source[i] === '?') {
        if (source[i + 1] === '<' && source[i + 2] !== '=' && source[i + 2] !== '!') {
          const close = source.indexOf('>', i);
          i = close < 0 ? source.length : close + 1; // (?<name>
        } else {
          i += source[i + 1] === '<' ? 3 : 2; // (?: (?= (?! (?<= (?<!
        }
      }
      previous = undefined;
      continue;
    }
    if (c === ')') {
      i++;
      if (open.length === 1) return undefined; // unbalanced: the RegExp would not have compiled
      const group = open.pop()!;
      group.end = i;
      const parent = open[open.length - 1];
      parent.quantified ||= group.quantified;
      parent.alternation ||= group.alternation;
      parent.repeats += Math.max(group.most, group.repeats);
      if (parent.repeats >= 3) return tooManyRepeats(parent, i);
      previous = group;
      continue;
    }
    if (c === '|') {
      top.alternation = true;
      top.most = Math.max(top.most, top.repeats);
      top.repeats = 0;
      i++;
      previous = undefined;
      continue;
    }
    let repeats: boolean | undefined;
    let unbounded = false;
    let length = 1;
    if (c === '*' || c === '+') repeats = unbounded = true;
    else if (c === '?') repeats = false;
    else if (c === '{') {
      const m = /^\{(\d+)(,(\d*))?\}/.exec(source.slice(i, i + 48));
      if (m) {
        length = m[0].length;
        repeats = m[2] === undefined ? Number(m[1]) > 1 : m[3] === '' || Number(m[3]) > 1;
        unbounded = m[2] !== undefined && m[3] === '';
      }
    }
    if (repeats === undefined) {
      i++;
      previous = undefined;
      continue;
    }
    i += length;
    if (source[i] === '?') i++; // lazy
    if (repeats && previous !== undefined && (previous.quantified || previous.alternation)) {
      const what = previous.quantified ? 'a quantifier' : 'an alternation';
      return `the group ${shown(source.slice(previous.start, previous.end))} is repeated by ${JSON.stringify(source.slice(previous.end, i))} and holds ${what} (as compiled; a repeated group holding a quantifier or an alternation can backtrack exponentially)`;
    }
    if (unbounded && ++top.repeats >= 3) return tooManyRepeats(top, i);
    top.quantified = true;
    previous = undefined;
  }
  return undefined;
}

/** Refuses a `pattern` ({ Regex } or { String }) that is too long or can backtrack catastrophically. */
function checkPattern(pattern: unknown, field: string, file: string): void {
  if (!isObject(pattern)) return;
  for (const kind of ['Regex', 'String'] as const) {
    if (!(kind in pattern)) continue;
    const value = pattern[kind];
    const at = `${field}.${kind}`;
    if (typeof value !== 'string') throw new ModelError('TANDEM_TOKENIZER_INVALID', `the pattern must be a string, not ${typeof value}`, { file, field: at });
    if (value.length > MAX_TOKENIZER_PATTERN_CHARS) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `the pattern is ${value.length} characters long; at most ${MAX_TOKENIZER_PATTERN_CHARS} are allowed`, { file, field: at });
    }
    if (kind === 'String') continue;
    // Checked as the library compiles it (Oniguruma rewritten to JavaScript): that is what runs.
    let compiled: RegExp | null;
    try {
      compiled = new ReplaceNormalizer({ type: 'Replace', pattern: { Regex: value }, content: '' }).pattern;
    } catch (cause) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `the pattern ${shown(value)} is not a valid regular expression: ${(cause as Error).message}`, { file, field: at, cause });
    }
    const hazard = backtrackingHazard(compiled instanceof RegExp ? compiled.source : value);
    if (hazard !== undefined) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `the pattern ${shown(value)} can backtrack catastrophically: ${hazard}`, { file, field: at });
    }
  }
}

/**
 * Walks the normalizer, pre_tokenizer and decoder trees of tokenizer.json (Sequence nodes
 * included, without recursion) and checks every `pattern` in them, before the library
 * compiles one.
 */
function checkPatterns(json: Record<string, unknown>, file: string): void {
  const pending: Array<{ value: unknown; field: string; depth: number }> = [];
  for (const root of ['normalizer', 'pre_tokenizer', 'decoder']) pending.push({ value: json[root], field: root, depth: 0 });
  while (pending.length > 0) {
    const { value, field, depth } = pending.pop()!;
    if (typeof value !== 'object' || value === null) continue;
    if (depth > MAX_TOKENIZER_NESTING) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `the tree is nested more than ${MAX_TOKENIZER_NESTING} levels deep`, { file, field });
    }
    if (Array.isArray(value)) {
      value.forEach((v, k) => pending.push({ value: v, field: `${field}[${k}]`, depth: depth + 1 }));
      continue;
    }
    for (const [key, v] of Object.entries(value)) {
      if (key === 'pattern') checkPattern(v, `${field}.pattern`, file);
      else pending.push({ value: v, field: `${field}.${key}`, depth: depth + 1 });
    }
  }
}

/**
 * Checks the token ids of tokenizer.json before the library lays them out in an array: each
 * id of `model.vocab` (an object of spelling → id; an array, for Unigram, is numbered by
 * position) and of `added_tokens` is an integer >= 0, and together they number 0 to N-1
 * without a gap (an id past the entries is one: it would also cost an array that long).
 */
function checkTokenIds(json: Record<string, unknown>, model: Record<string, unknown>, file: string): void {
  const ids: number[] = [];
  const idAt = (id: unknown, field: string): void => {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `token id ${JSON.stringify(id) ?? String(id)} is not an integer >= 0`, { file, field });
    }
    ids.push(id);
  };
  const vocab = model.vocab;
  if (Array.isArray(vocab)) {
    for (let k = 0; k < vocab.length; k++) ids.push(k);
  } else if (isObject(vocab)) {
    for (const [spelling, id] of Object.entries(vocab)) idAt(id, `model.vocab[${JSON.stringify(spelling)}]`);
  }
  const added = json.added_tokens;
  if (added !== undefined) {
    if (!Array.isArray(added)) throw new ModelError('TANDEM_TOKENIZER_INVALID', 'added_tokens must be an array', { file, field: 'added_tokens' });
    added.forEach((token, k) => idAt(isObject(token) ? token.id : undefined, `added_tokens[${k}].id`));
  }
  // A tokenizer without tokens encoded every text as undefined ids (found by fuzzing).
  if (ids.length === 0) throw new ModelError('TANDEM_TOKENIZER_INVALID', 'the vocabulary holds no token', { file, field: 'model.vocab' });
  let max = 0;
  for (const id of ids) if (id > max) max = id;
  const seen = new Uint8Array(Math.min(max + 1, ids.length));
  for (const id of ids) if (id < seen.length) seen[id] = 1;
  // max >= ids.length leaves one of 0..ids.length-1 unseen, so the loop finds the gap.
  for (let id = 0; id < seen.length; id++) {
    if (seen[id] === 0) {
      throw new ModelError('TANDEM_TOKENIZER_INVALID', `no token has id ${id} though ids run to ${max}: the vocabulary must number its tokens 0 to N-1 without gaps`, { file, field: 'model.vocab' });
    }
  }
}

/**
 * Refuses a tokenizer that has ids the model has no embedding row for: every id the tokenizer
 * can produce must be below the model's vocab_size (a model may have more rows than tokens).
 */
export function checkTokenizerFits(tokenizer: Pick<Tokenizer, 'path' | 'vocabSize'>, vocabSize: number): void {
  if (tokenizer.vocabSize > vocabSize) {
    throw new ModelError(
      'TANDEM_TOKENIZER_INVALID',
      `the tokenizer has ${tokenizer.vocabSize} token ids (0 to ${tokenizer.vocabSize - 1}) but the model's vocab_size is ${vocabSize}: ids from ${vocabSize} have no embedding`,
      { file: tokenizer.path },
    );
  }
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
  checkTokenIds(json, json.model, path);
  checkPatterns(json, path);
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
  // Loops, not Math.max(...spread): a spread of ~128k arguments or more overflows the stack.
  let maxId = -1;
  let maxTokenChars = 1;
  for (const [spelling, id] of vocab) {
    if (id > maxId) maxId = id;
    if (typeof spelling === 'string' && spelling.length > maxTokenChars) maxTokenChars = spelling.length;
  }
  const vocabSize = maxId + 1;
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
      const kept: number[] = [];
      for (const id of ids) {
        if (options.skipOutOfVocabulary === true && Number.isInteger(id) && id >= vocabSize) continue;
        if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
          throw new ModelError('TANDEM_INPUT_INVALID', `token id ${id} is outside the vocabulary [0, ${vocabSize})`, { file: path });
        }
        kept.push(id);
      }
      return hf.decode(kept, { skip_special_tokens: options.skipSpecialTokens ?? false });
    },
  };
}
