import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { loadTokenizer } from '../../model/index.ts';
import { STORIES_DIR, rejectsModelError, tempDir, throwsModelError } from './helpers.ts';

interface Reference {
  prompt: string;
  input_ids: number[];
  greedy_ids: number[];
  greedy_text: string;
  full_text: string;
}

const reference = JSON.parse(await readFile(join(STORIES_DIR, 'reference-once-upon-a-time.json'), 'utf8')) as Reference;

describe('stories260K tokenizer', () => {
  test('encodes the reference prompt to the reference ids, BOS first', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    assert.deepEqual(tok.encode('Once upon a time'), [1, 403, 407, 261, 378]);
    assert.deepEqual(tok.encode(reference.prompt), reference.input_ids);
    assert.deepEqual(tok.encode(reference.prompt, { addSpecialTokens: false }), reference.input_ids.slice(1));
  });

  test('decodes the reference continuation to the reference text', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    assert.equal(tok.decode(reference.greedy_ids), reference.greedy_text);
    assert.equal(tok.decode([...reference.input_ids, ...reference.greedy_ids], { skipSpecialTokens: true }), reference.full_text);
    assert.equal(tok.decode([1, 403, 2]), '<s> Once</s>');
  });

  test('knows its special tokens and vocabulary size', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    assert.equal(tok.bosTokenId, 1);
    assert.equal(tok.eosTokenId, 2);
    assert.equal(tok.vocabSize, 512);
    assert.equal(tok.path, join(STORIES_DIR, 'tokenizer.json'));
  });

  test('text round-trips, including bytes outside the vocabulary', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    for (const text of ['Lily and Tom went to the park.', '  leading and trailing  ', 'tabs\tand\nnewlines', 'café 日本 🙂', '']) {
      assert.equal(tok.decode(tok.encode(text), { skipSpecialTokens: true }), text);
    }
  });

  test('decoding an id outside the vocabulary is an input error', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    throwsModelError(() => tok.decode([1, 512]), 'TANDEM_INPUT_INVALID', '512');
    throwsModelError(() => tok.decode([-1]), 'TANDEM_INPUT_INVALID', '-1');
  });

  test('skipOutOfVocabulary leaves out the ids past the vocabulary (a padded model), and still refuses negative ones', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    const ids = tok.encode('Once upon a time');
    assert.equal(tok.decode([...ids.slice(0, 2), 512, 600, ...ids.slice(2)], { skipOutOfVocabulary: true }), tok.decode(ids));
    throwsModelError(() => tok.decode([1, -1], { skipOutOfVocabulary: true }), 'TANDEM_INPUT_INVALID', '-1');
  });

  test('without tokenizer_config.json it still loads, with <s> and </s> as BOS and EOS', async () => {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    const tok = await loadTokenizer(dir);
    assert.deepEqual(tok.encode('Once upon a time'), [1, 403, 407, 261, 378]);
    assert.equal(tok.bosTokenId, 1);
    assert.equal(tok.eosTokenId, 2);
  });
});

describe('tokenizers that cannot be loaded', () => {
  test('no tokenizer.json', async () => {
    const dir = await tempDir();
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_MODEL_FILE_MISSING', join(dir, 'tokenizer.json'));
  });

  test('tokenizer.json that is not JSON, or has no model', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'tokenizer.json'), '{"model": ');
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', join(dir, 'tokenizer.json'));
    await writeFile(join(dir, 'tokenizer.json'), '{"version": "1.0"}');
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'model');
  });

  test('tokenizer.json the library cannot build', async () => {
    const dir = await tempDir();
    const json = JSON.parse(await readFile(join(STORIES_DIR, 'tokenizer.json'), 'utf8')) as Record<string, unknown>;
    delete json.decoder;
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(json));
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', join(dir, 'tokenizer.json'));
  });

  test('tokenizer_config.json that is not an object', async () => {
    const dir = await tempDir();
    await copyFile(join(STORIES_DIR, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    await writeFile(join(dir, 'tokenizer_config.json'), '[]');
    await rejectsModelError(loadTokenizer(dir), 'TANDEM_TOKENIZER_INVALID', join(dir, 'tokenizer_config.json'));
  });
});
