// The text of a completion as its tokens arrive, decoded incrementally (vLLM's scheme): each
// new token is decoded with the few tokens before it (so that a tokenizer that strips a leading
// space, or joins bytes into a character, decodes it as it reads after them), and text is
// committed once it ends in a whole character. A token costs a decode of a handful of ids, not
// of the prompt and everything generated so far (which made a request O(n²) on the event loop).
// The text is cut at the first stop sequence and released for streaming only up to what can no
// longer change (no half-decoded character, no possible start of a stop sequence).
import type { Tokenizer } from '../../model/index.ts';

/** Tokens of context kept before the text not yet committed (vLLM's initial offset). */
export const DECODE_CONTEXT_TOKENS = 5;

export class CompletionText {
  readonly #tokenizer: Tokenizer;
  readonly #stop: readonly string[];
  readonly #maxStop: number;
  /** The tokens before the committed text's end (context), then those not committed yet (from #read). */
  #window: number[];
  #read: number;
  #committed = '';
  #text = '';
  #sent = 0;
  #stopped = false;

  constructor(tokenizer: Tokenizer, promptIds: readonly number[], stop: readonly string[]) {
    this.#tokenizer = tokenizer;
    this.#window = promptIds.slice(-DECODE_CONTEXT_TOKENS);
    this.#read = this.#window.length;
    this.#stop = stop;
    this.#maxStop = stop.reduce((n, s) => Math.max(n, s.length), 0);
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  /** The whole text so far (cut at a stop sequence). */
  get text(): string {
    return this.#text;
  }

  /**
   * Adds a token; true when a stop sequence now ends the text. A model may have more rows than
   * its tokenizer has tokens (Qwen2: 151,936 and 151,665; the padding rows can still be sampled,
   * and an adapter can make them likely): such an id has no text (decode's skipOutOfVocabulary).
   */
  push(id: number): boolean {
    if (this.#stopped) return true;
    this.#window.push(id);
    const decode = (ids: number[]): string => this.#tokenizer.decode(ids, { skipSpecialTokens: true, skipOutOfVocabulary: true });
    const before = decode(this.#window.slice(0, this.#read));
    const after = decode(this.#window);
    let pending = after.length > before.length ? after.slice(before.length) : '';
    // Text before the last committed end did not change: a stop sequence is searched from where it could begin.
    const searchFrom = Math.max(0, this.#committed.length - this.#maxStop + 1);
    if (pending.length > 0 && !pending.endsWith('\uFFFD')) {
      this.#committed += pending;
      pending = '';
      this.#window = this.#window.slice(this.#read);
      this.#read = this.#window.length;
    }
    let text = this.#committed + pending;
    let cut = -1;
    for (const s of this.#stop) {
      const at = text.indexOf(s, searchFrom);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      text = text.slice(0, cut);
      this.#stopped = true;
    }
    this.#text = text;
    return this.#stopped;
  }

  /** New text that can be streamed now; `final` releases the rest. */
  take(final = false): string {
    let end = this.#text.length;
    if (!final && !this.#stopped) {
      while (end > this.#sent && this.#text[end - 1] === '\uFFFD') end--;
      const hold = this.#stop.reduce((n, s) => Math.max(n, s.length - 1), 0);
      for (let k = Math.min(hold, end - this.#sent); k > 0; k--) {
        const tail = this.#text.slice(end - k, end);
        if (this.#stop.some((s) => s.startsWith(tail))) {
          end -= k;
          break;
        }
      }
    }
    if (end <= this.#sent) return '';
    const out = this.#text.slice(this.#sent, end);
    this.#sent = end;
    return out;
  }
}
