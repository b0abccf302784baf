// A served request's prompt as token ids, checked against the context. Tokenizing runs on the
// event loop at about 10 µs a character here (a 1 MiB body: over 10 s in which the node answers
// nobody), so a prompt that cannot fit is refused by its length before it is tokenized.
import type { Tokenizer } from '../../model/index.ts';
import { CloudError } from '../errors.ts';

/**
 * Slack for normalizers that shorten text (NFC composes a letter and its marks into one
 * character): a prompt is tokenized when it has at most context × longest token × this.
 */
export const PROMPT_CHARS_SLACK = 2;

/**
 * A prompt longer than context × this many characters has its head tokenized first: text runs
 * about 4 characters a token, so a head that already overflows the context (with a margin for
 * the token its cut splits) ends the request after context × 8 characters of work, not after
 * the whole prompt's (context × the longest token × 2).
 */
export const PROMPT_HEAD_CHARS_PER_TOKEN = 8;
const HEAD_MARGIN_TOKENS = 64;

/** The most characters of prompt that are tokenized for a context of `context` tokens. */
export function maxPromptChars(tokenizer: Tokenizer, context: number): number {
  return context * tokenizer.maxTokenChars * PROMPT_CHARS_SLACK;
}

/**
 * The prompt's ids, leaving room for at least one new token in the context; a prompt too long
 * for it is TANDEM_SERVE_PROMPT_TOO_LONG, by its characters (not tokenized) or by its tokens.
 */
export function promptIds(tokenizer: Tokenizer, prompt: string, context: number): number[] {
  const maxChars = maxPromptChars(tokenizer, context);
  if (prompt.length > maxChars) {
    throw new CloudError('TANDEM_SERVE_PROMPT_TOO_LONG', {
      actual: `${prompt.length} characters`,
      limit: `${maxChars} characters (the context holds ${context} tokens of at most ${tokenizer.maxTokenChars} characters)`,
      field: 'prompt',
    });
  }
  const headChars = context * PROMPT_HEAD_CHARS_PER_TOKEN;
  if (prompt.length > headChars) {
    const head = tokenizer.encode(prompt.slice(0, headChars)).length;
    if (head >= context + HEAD_MARGIN_TOKENS) {
      throw new CloudError('TANDEM_SERVE_PROMPT_TOO_LONG', { actual: `${head} tokens in its first ${headChars} characters`, limit: `${context - 1} tokens (the context holds ${context}, with at least one new token)`, field: 'prompt' });
    }
  }
  const ids = tokenizer.encode(prompt);
  if (ids.length === 0) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: 'the prompt has no tokens', field: 'prompt' });
  if (ids.length >= context) {
    throw new CloudError('TANDEM_SERVE_PROMPT_TOO_LONG', { actual: `${ids.length} tokens`, limit: `${context - 1} tokens (the context holds ${context}, with at least one new token)`, field: 'prompt' });
  }
  return ids;
}
