// The text of a completion as its tokens arrive: decoded with the prompt before it (so that a
// tokenizer that strips a leading space decodes the new text as it reads after the prompt),
// cut at the first stop sequence, and released for streaming only up to what can no longer
// change (no half-decoded character, no possible start of a stop sequence).
import type { Tokenizer } from '../../model/index.ts';

export class CompletionText {
  readonly #tokenizer: Tokenizer;
  readonly #promptIds: number[];
  readonly #promptText: string;
  readonly #stop: readonly string[];
  readonly #ids: number[] = [];
  #text = '';
  #sent = 0;
  #stopped = false;

  constructor(tokenizer: Tokenizer, promptIds: number[], stop: readonly string[]) {
    this.#tokenizer = tokenizer;
    this.#promptIds = promptIds;
    this.#promptText = tokenizer.decode(promptIds, { skipSpecialTokens: true });
    this.#stop = stop;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  /** The whole text so far (cut at a stop sequence). */
  get text(): string {
    return this.#text;
  }

  /** Adds a token; true when a stop sequence now ends the text. */
  push(id: number): boolean {
    if (this.#stopped) return true;
    this.#ids.push(id);
    const full = this.#tokenizer.decode([...this.#promptIds, ...this.#ids], { skipSpecialTokens: true });
    let text = full.startsWith(this.#promptText) ? full.slice(this.#promptText.length) : this.#tokenizer.decode(this.#ids, { skipSpecialTokens: true });
    let cut = -1;
    for (const s of this.#stop) {
      const at = text.indexOf(s);
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
