// tokenizer.json is read from a model folder, that is from anyone: a vocabulary of today's
// sizes loads, and what it must not hold (gaps in the ids, ids past the model's vocab_size,
// regexes that backtrack catastrophically) is refused with a typed error before it costs.
import assert from 'node:assert/strict';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { main } from '../../cli/main.ts';
import type { CommandIo } from '../../cli/io.ts';
import { MAX_TOKENIZER_PATTERN_CHARS, checkTokenizerFits, loadTokenizer } from '../../model/index.ts';
import { STORIES_DIR, rejectsModelError, tempDir, throwsModelError } from './helpers.ts';

interface Json {
  model: { vocab: Record<string, number> };
  added_tokens: Array<Record<string, unknown>>;
  normalizer?: unknown;
  pre_tokenizer?: unknown;
  decoder?: unknown;
}

const fixture = JSON.parse(await readFile(join(STORIES_DIR, 'tokenizer.json'), 'utf8')) as Json;

/** A folder holding the fixture's tokenizer_config.json and the fixture's tokenizer.json as `edit` leaves it. */
async function tokenizerDir(edit: (json: Json) => void): Promise<string> {
  const dir = await tempDir();
  const json = structuredClone(fixture);
  edit(json);
  await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(json));
  await cp(join(STORIES_DIR, 'tokenizer_config.json'), join(dir, 'tokenizer_config.json'));
  return dir;
}

/** A regex pattern as a Split pre-tokenizer. */
const split = (regex: string): Record<string, unknown> => ({ type: 'Split', pattern: { Regex: regex }, behavior: 'Isolated', invert: false });

const LLAMA3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

describe('vocabulary sizes and ids', () => {
  test('a vocabulary of 150,000 tokens (Llama-3 and Qwen2 sizes) loads', async () => {
    const dir = await tokenizerDir((json) => {
      const vocab = json.model.vocab;
      for (let id = Object.keys(vocab).length; id < 150_000; id++) vocab[`x${id}`] = id;
      vocab['a-rather-long-spelling-of-thirty'] = 150_000;
    });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.vocabSize, 150_001);
    assert.equal(tok.maxTokenChars, 'a-rather-long-spelling-of-thirty'.length);
    assert.deepEqual(tok.encode('Once upon a time'), [1, 403, 407, 261, 378]);
    assert.equal(tok.decode([150_000]), 'a-rather-long-spelling-of-thirty');
  });

  test('a gap in the token ids is refused, naming the missing id and the largest', async () => {
    const dir = await tokenizerDir((json) => {
      json.added_tokens.push({ id: 700, content: '<zz>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: false });
    });
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'id 512', '700', 'without gaps');
    const inVocab = await tokenizerDir((json) => {
      delete json.model.vocab['~'];
    });
    const missing = String(fixture.model.vocab['~']);
    await rejectsModelError(loadTokenizer(inVocab), 'TANDEM_TOKENIZER_INVALID', `id ${missing}`, 'without gaps');
  });

  test('a vocabulary without a token is refused (it encoded every text as undefined ids; found by fuzzing)', async () => {
    const dir = await tokenizerDir((json) => {
      json.model.vocab = {};
      json.added_tokens = [];
      (json.model as Record<string, unknown>).merges = [];
    });
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', 'holds no token');
  });

  test('an id far past the entries is refused before anything is laid out for it', async () => {
    const dir = await tokenizerDir((json) => {
      json.added_tokens.push({ id: 50_000_000, content: '<far>', special: true });
    });
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', 'id 512', '50000000');
  });

  test('an id that is not an integer >= 0 is refused, naming where it is', async () => {
    for (const [id, field] of [[-1, 'added_tokens[3].id'], [2.5, 'added_tokens[3].id'], ['7', 'added_tokens[3].id']] as const) {
      const dir = await tokenizerDir((json) => {
        json.added_tokens.push({ id, content: '<odd>', special: true });
      });
      await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', field, 'integer >= 0');
    }
    const dir = await tokenizerDir((json) => {
      json.model.vocab.odd = -3;
    });
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', 'model.vocab["odd"]', '-3');
  });
});

describe('a tokenizer with ids past the model vocab_size', () => {
  const oneMore = (json: Json): void => {
    json.added_tokens.push({ id: 512, content: '<zz>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: false });
  };

  test('checkTokenizerFits refuses it, naming both sizes, and passes one that fits', async () => {
    const tok = await loadTokenizer(await tokenizerDir(oneMore));
    assert.equal(tok.vocabSize, 513);
    throwsModelError(() => checkTokenizerFits(tok, 512), 'TANDEM_TOKENIZER_INVALID', '513', 'vocab_size is 512', tok.path);
    checkTokenizerFits(tok, 513);
    checkTokenizerFits(await loadTokenizer(STORIES_DIR), 512);
    checkTokenizerFits(await loadTokenizer(STORIES_DIR), 1024); // a model may have more rows than tokens
  });

  test('tandem generate refuses the folder with the stable code, before generating', async () => {
    const dir = await tokenizerDir(oneMore);
    for (const file of ['config.json', 'model.safetensors']) await cp(join(STORIES_DIR, file), join(dir, file));
    const out: string[] = [];
    const log: string[] = [];
    const io: CommandIo = { out: (l) => out.push(l), log: (l) => log.push(l) };
    const code = await main(['generate', '--model', dir, '--prompt', 'Once', '--max-new-tokens', '1', '--backend', 'cpu', '--engine', 'cpu'], io);
    assert.notEqual(code, 0);
    assert.deepEqual(out, []);
    assert.match(log.join('\n'), /TANDEM_TOKENIZER_INVALID.*vocab_size is 512/);
  });
});

describe('regular expressions in tokenizer.json', () => {
  test('a pre_tokenizer regex with nested quantifiers is refused; GPT-2, Llama-3 and Qwen2 regexes load', async () => {
    const bad = await tokenizerDir((json) => {
      json.pre_tokenizer = split('(\\w+\\s?)+$');
    });
    await rejectsModelError(loadTokenizer(bad), 'TANDEM_TOKENIZER_INVALID', 'field pre_tokenizer.pattern.Regex', '(\\\\w+\\\\s?)+$', 'backtrack');
    for (const regex of [LLAMA3, QWEN2, GPT2]) {
      const dir = await tokenizerDir((json) => {
        json.pre_tokenizer = { type: 'Sequence', pretokenizers: [split(regex), json.pre_tokenizer].filter(Boolean) };
      });
      const tok = await loadTokenizer(dir);
      assert.equal(tok.decode(tok.encode("It's 2024: we'll see!\n  ok"), { skipSpecialTokens: true }), "It's 2024: we'll see!\n  ok");
    }
  });

  test('dangerous regexes are found inside Sequence nodes of the pre_tokenizer, the normalizer and the decoder', async () => {
    const cases: Array<[(json: Json) => void, string]> = [
      [(json) => { json.pre_tokenizer = { type: 'Sequence', pretokenizers: [split(GPT2), split('(?:a|ab)*c')] }; }, 'pre_tokenizer.pretokenizers[1].pattern.Regex'],
      [(json) => { json.normalizer = { type: 'Sequence', normalizers: [json.normalizer, { type: 'Replace', pattern: { Regex: '(a+)+b' }, content: '' }] }; }, 'normalizer.normalizers[1].pattern.Regex'],
      [(json) => { json.decoder = { type: 'Sequence', decoders: [{ type: 'Replace', pattern: { Regex: '((ab)*)*' }, content: '' }, json.decoder] }; }, 'decoder.decoders[0].pattern.Regex'],
      [(json) => { json.pre_tokenizer = split('(a)\\1+'); }, 'pre_tokenizer.pattern.Regex'],
      // Polynomial, no group needed: 25 characters took 18 s (found by fuzzing).
      [(json) => { json.pre_tokenizer = split('a*a*a*a*a*a*a*a*a*a*a*a*b'); }, 'pre_tokenizer.pattern.Regex'],
      [(json) => { json.normalizer = { type: 'Replace', pattern: { Regex: 'x|\\s*.+\\w{2,}y' }, content: '' }; }, 'normalizer.pattern.Regex'],
      // The same spread over groups.
      [(json) => { json.pre_tokenizer = split('(?:a*)(?:b|a*)(a*)c'); }, 'pre_tokenizer.pattern.Regex'],
    ];
    for (const [edit, field] of cases) {
      await rejectsModelError(loadTokenizer(await tokenizerDir(edit)), 'TANDEM_TOKENIZER_INVALID', `field ${field}`, 'backtrack');
    }
  });

  test('a pattern longer than the limit is refused, naming its length and the limit', async () => {
    const long = 'a'.repeat(MAX_TOKENIZER_PATTERN_CHARS + 1);
    for (const pattern of [{ Regex: long }, { String: long }]) {
      const dir = await tokenizerDir((json) => {
        json.pre_tokenizer = { type: 'Split', pattern, behavior: 'Isolated', invert: false };
      });
      await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', `${MAX_TOKENIZER_PATTERN_CHARS + 1} characters`, `at most ${MAX_TOKENIZER_PATTERN_CHARS}`);
    }
  });
});
