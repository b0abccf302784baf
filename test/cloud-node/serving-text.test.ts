// A served request's text: the prompt is refused by its length before it is tokenized, and the
// completion is decoded incrementally (a few ids a token), equal to decoding it whole.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadTokenizer } from '../../model/index.ts';
import type { Tokenizer } from '../../model/index.ts';
import { CompletionText } from '../../cloud-node/serving/completion-text.ts';
import { maxPromptChars, PROMPT_HEAD_CHARS_PER_TOKEN, promptIds } from '../../cloud-node/serving/prompt-ids.ts';
import { CloudError } from '../../cloud-node/errors.ts';
import { STORIES_DIR as FIXTURE } from './helpers.ts';

/** The tokenizer, counting what it is asked to encode and decode. */
async function countingTokenizer(): Promise<Tokenizer & { encoded: number; decodedIds: number }> {
  const tok = await loadTokenizer(FIXTURE);
  const counting = {
    ...tok,
    encoded: 0,
    decodedIds: 0,
    encode(text: string, options?: Parameters<Tokenizer['encode']>[1]): number[] {
      counting.encoded += text.length;
      return tok.encode(text, options);
    },
    decode(ids: readonly number[], options?: Parameters<Tokenizer['decode']>[1]): string {
      counting.decodedIds += ids.length;
      return tok.decode(ids, options);
    },
  };
  return counting;
}

/** What the completion's text is by definition: the whole decoded after the prompt's decoded text. */
function reference(tok: Tokenizer, prompt: number[], ids: number[]): string {
  const promptText = tok.decode(prompt, { skipSpecialTokens: true });
  return tok.decode([...prompt, ...ids], { skipSpecialTokens: true }).slice(promptText.length);
}

/** A deterministic generator (mulberry32). */
function random(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const PIECES = ['Once', ' upon a time', ' there was', ' café', ' naïve', ' 🐻 bear', ' €5', ' "Hi!"', '\n', '  two  spaces', ' Lily', ' 日本', '.'];

describe('a served prompt is checked before it is tokenized', () => {
  it('a prompt longer than context × longest token × slack is refused without tokenizing it', async () => {
    const tok = await countingTokenizer();
    const limit = maxPromptChars(tok, 512);
    assert.equal(limit, 512 * tok.maxTokenChars * 2);
    assert.ok(tok.maxTokenChars >= 2 && tok.maxTokenChars < 64, `longest token ${tok.maxTokenChars}`);
    const error = (() => {
      try {
        promptIds(tok, 'a'.repeat(limit + 1), 512);
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    assert.ok(error instanceof CloudError, String(error));
    assert.equal(error.code, 'TANDEM_SERVE_PROMPT_TOO_LONG');
    assert.match(error.message, new RegExp(`holds ${limit + 1} characters; at most ${limit} characters`));
    assert.equal(tok.encoded, 0, 'nothing was tokenized');
  });

  it('a prompt under the character limit is tokenized, and refused by its tokens when they fill the context', async () => {
    const tok = await countingTokenizer();
    const prompt = 'Once upon a time '.repeat(200);
    assert.ok(prompt.length <= maxPromptChars(tok, 512));
    assert.throws(() => promptIds(tok, prompt, 512), (e: unknown) => e instanceof CloudError && e.code === 'TANDEM_SERVE_PROMPT_TOO_LONG' && /tokens/.test(e.message));
    assert.equal(tok.encoded, prompt.length);
    assert.deepEqual(promptIds(tok, 'Once upon a time', 512), tok.encode('Once upon a time'));
  });

  it('a long prompt whose head already overflows the context is refused after its head is tokenized', async () => {
    const tok = await countingTokenizer();
    const prompt = 'Once upon a time there was a little girl. '.repeat(150);
    assert.ok(prompt.length > 512 * PROMPT_HEAD_CHARS_PER_TOKEN && prompt.length <= maxPromptChars(tok, 512));
    assert.throws(() => promptIds(tok, prompt, 512), (e: unknown) => e instanceof CloudError && e.code === 'TANDEM_SERVE_PROMPT_TOO_LONG' && /in its first 4096 characters/.test(e.message));
    assert.equal(tok.encoded, 512 * PROMPT_HEAD_CHARS_PER_TOKEN, 'only the head was tokenized');
  });

  it('every vocabulary entry decodes to at most maxTokenChars characters', async () => {
    const tok = await loadTokenizer(FIXTURE);
    for (let id = 0; id < tok.vocabSize; id++) assert.ok(tok.decode([id]).length <= tok.maxTokenChars, `token ${id}`);
  });
});

describe('CompletionText', () => {
  it('equals the whole decode after the prompt for texts with multi-byte characters, token by token', async () => {
    const tok = await loadTokenizer(FIXTURE);
    const next = random(7);
    for (let trial = 0; trial < 40; trial++) {
      const prompt = tok.encode(PIECES.slice(0, 1 + Math.floor(next() * 4)).join(''));
      let generated = '';
      for (let k = 0; k < 12; k++) generated += PIECES[Math.floor(next() * PIECES.length)];
      const ids = tok.encode(generated, { addSpecialTokens: false });
      // A random vocabulary token now and then: byte tokens, whole words, specials.
      for (let k = 0; k < 3; k++) ids.splice(Math.floor(next() * ids.length), 0, Math.floor(next() * tok.vocabSize));
      const text = new CompletionText(tok, prompt, []);
      let streamed = '';
      for (let i = 0; i < ids.length; i++) {
        text.push(ids[i]);
        streamed += text.take();
        assert.ok(!streamed.includes('\uFFFD') || reference(tok, prompt, ids.slice(0, i + 1)).startsWith(streamed), `trial ${trial} token ${i}: streamed text never changes`);
      }
      streamed += text.take(true);
      assert.equal(text.text, reference(tok, prompt, ids), `trial ${trial}`);
      assert.equal(streamed, text.text, `trial ${trial}: the streamed pieces add up to the text`);
    }
  });

  it("gives no text for an id the model has and its tokenizer lacks (a padded vocabulary), as Hugging Face's decode skips it", async () => {
    const tok = await loadTokenizer(FIXTURE);
    const prompt = tok.encode('Once upon a time');
    const ids = tok.encode(' there was a girl', { addSpecialTokens: false });
    const text = new CompletionText(tok, prompt, []);
    for (const [i, id] of ids.entries()) {
      text.push(id);
      if (i === 1) assert.equal(text.push(tok.vocabSize + 3), false, 'a row past the tokenizer: no text, no stop');
    }
    assert.equal(text.text, reference(tok, prompt, ids));
  });

  it('decodes a handful of ids a token, however long the prompt and the completion', async () => {
    const tok = await countingTokenizer();
    const prompt = tok.encode('Once upon a time there was a little girl. '.repeat(30));
    const ids = tok.encode(' She liked to play in the park with her friends every day.'.repeat(20), { addSpecialTokens: false });
    assert.ok(prompt.length > 300 && ids.length > 200);
    const text = new CompletionText(tok, prompt, ['never']);
    for (const id of ids) text.push(id);
    assert.equal(text.text, reference(await loadTokenizer(FIXTURE), prompt, ids));
    // Two decodes a token of at most context + the token's own run: far from prompt + completion.
    assert.ok(tok.decodedIds <= ids.length * 2 * 8, `${tok.decodedIds} ids decoded for ${ids.length} tokens`);
  });

  it('cuts at a stop sequence that spans tokens, and streams none of it', async () => {
    const tok = await loadTokenizer(FIXTURE);
    const prompt = tok.encode('Once');
    const ids = tok.encode(' upon a time there was a girl named Lily. She liked cats.', { addSpecialTokens: false });
    const text = new CompletionText(tok, prompt, ['named Li', 'xyz']);
    let streamed = '';
    let stoppedAt = -1;
    for (let i = 0; i < ids.length; i++) {
      const stopped = text.push(ids[i]);
      streamed += text.take();
      assert.ok(!streamed.includes('named'), `token ${i}: the start of a stop sequence is held back`);
      if (stopped) {
        stoppedAt = i;
        break;
      }
    }
    streamed += text.take(true);
    assert.ok(stoppedAt > 0);
    const whole = reference(tok, prompt, ids);
    assert.equal(text.text, whole.slice(0, whole.indexOf('named Li')));
    assert.match(text.text, /there was a girl $/);
    assert.equal(streamed, text.text);
    assert.equal(text.push(ids[0]), true, 'a stopped text stays stopped');
  });
});
