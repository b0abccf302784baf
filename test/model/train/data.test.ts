import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ModelError } from '../../../model/errors.ts';
import { IGNORE_INDEX } from '../../../model/loss.ts';
import { BatchStream, exampleRows, labelRow, packRows, parseDataset, prepareData, readDataset } from '../../../model/train/data.ts';
import type { TextTokenizer } from '../../../model/train/data.ts';
import { loadTokenizer } from '../../../model/tokenizer.ts';
import { STORIES_DIR, tempDir } from '../helpers.ts';

/** One token per character (code − 90, so 'a' is 7), bos 1, eos 2. */
const chars: TextTokenizer = { encode: (t) => [...t].map((c) => c.charCodeAt(0) - 90), bosTokenId: 1, eosTokenId: 2 };
const I = IGNORE_INDEX;

function dataError(file: string, line: number): (e: unknown) => boolean {
  return (e) => {
    assert.ok(e instanceof ModelError, String(e));
    assert.equal(e.code, 'TANDEM_DATA_INVALID');
    assert.ok(e.message.includes(file) && e.message.includes(`line ${line}:`), e.message);
    return true;
  };
}

describe('training data', () => {
  it('reads each record format and plain text', async () => {
    assert.equal(parseDataset('{"text":"ab"}\n\n{"text":"c"}\n', 'd.jsonl').examples.length, 2);
    assert.equal(parseDataset('{"prompt":"a","completion":"b"}', 'd.jsonl').format, 'completion');
    assert.equal(parseDataset('{"text":"a","label":"yes"}', 'd.jsonl').format, 'label');
    assert.equal(parseDataset('any text\nat all', 'd.txt').format, 'plain');
    const dir = await tempDir();
    const file = join(dir, 'x.jsonl');
    await writeFile(file, '{"text":"a"}\n{"text": 3}\n');
    await assert.rejects(readDataset(file), dataError(file, 2));
  });

  it('names the file and line of every malformed record', () => {
    const cases: [string, number][] = [
      ['{"text":"a"}\n{"text":"b"\n', 2],
      ['{"text":"a"}\n\n[1,2]\n', 3],
      ['{"body":"a"}\n', 1],
      ['{"text":"a"}\n{"prompt":"p","completion":"c"}\n', 2],
      ['{"prompt":"p"}\n', 1],
      ['{"prompt":"p","completion":null}\n', 1],
      ['{"text":"a","label":"x"}\n{"text":"b","label":""}\n', 2],
      ['{"text":"a","label":"x"}\n{"text":"b","label":7}\n', 2],
    ];
    for (const [content, line] of cases) assert.throws(() => parseDataset(content, 'bad.jsonl'), dataError('bad.jsonl', line), content);
    assert.throws(() => parseDataset('\n\n', 'e.jsonl'), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_DATA_EMPTY');
  });

  it('takes the loss on the completion only', () => {
    const [row] = exampleRows(chars, { kind: 'completion', line: 1, prompt: 'ab', completion: 'cd' }, 16);
    assert.deepEqual(row.ids, [1, 7, 8, 9, 10, 2]);
    assert.deepEqual(row.labels, [I, I, I, 9, 10, 2]);
    // Too long: the start of the prompt goes, bos and the completion stay.
    const [cut] = exampleRows(chars, { kind: 'completion', line: 1, prompt: 'abcdef', completion: 'gh' }, 5);
    assert.deepEqual(cut.ids, [1, 12, 13, 14, 2]);
    assert.deepEqual(cut.labels, [I, I, 13, 14, 2]);
  });

  it('labels only the label word of classification records, with a real tokenizer', async () => {
    const tok = await loadTokenizer(STORIES_DIR);
    const row = labelRow(tok, 'Lily is happy', 'positive', 64);
    const full = [tok.bosTokenId as number, ...tok.encode('Lily is happy positive', { addSpecialTokens: false })];
    assert.deepEqual(row.ids, full);
    const labelled = row.labels.filter((l) => l !== I);
    assert.ok(labelled.length > 0 && labelled.length < full.length - 1);
    assert.deepEqual(labelled, full.slice(full.length - labelled.length));
  });

  it('packs sequences with bos between them and pads the rest', () => {
    const rows = ['ab', 'cde', 'f'].map((text) => exampleRows(chars, { kind: 'text', line: 1, text }, 8)[0]);
    const packed = packRows(rows, 8, 2);
    assert.deepEqual(packed[0].ids, [1, 7, 8, 2, 2, 2, 2, 2]);
    assert.deepEqual(packed[0].labels, [I, 7, 8, 2, I, I, I, I]);
    assert.deepEqual(packed[1].labels, [I, 9, 10, 11, 2, I, 12, 2]);
    assert.deepEqual(packed[1].ids, [1, 9, 10, 11, 2, 1, 12, 2]);
    // Plain text is one document chunked to the sequence length.
    const plain = prepareData(parseDataset('abcdefghijklmnopqrst', 'story.txt'), chars, { seqLen: 8, valFraction: 0, seed: 1 });
    assert.deepEqual(plain.train.map((r) => r.ids.length), [8, 8, 8]);
    const tokens = [1, ...'abcdefghijklmnopqrst'.split('').map((c) => c.charCodeAt(0) - 90), 2];
    const inOrder = [...plain.train].sort((x, y) => (x.ids[0] === 1 ? -1 : y.ids[0] === 1 ? 1 : x.ids[0] - y.ids[0]));
    assert.deepEqual(inOrder.flatMap((r) => r.ids).slice(0, 22), tokens);
    // A long text is chunked, not dropped.
    assert.equal(exampleRows(chars, { kind: 'text', line: 1, text: 'abcdefghij' }, 4).length, 3);
  });

  it('splits and shuffles by seed, and a batch stream resumes exactly', () => {
    const ds = parseDataset(Array.from({ length: 20 }, (_, i) => JSON.stringify({ text: 'ab'.repeat(1 + (i % 3)) })).join('\n'), 'd.jsonl');
    const a = prepareData(ds, chars, { seqLen: 8, valFraction: 0.2, seed: 3, pack: false });
    const b = prepareData(ds, chars, { seqLen: 8, valFraction: 0.2, seed: 3, pack: false });
    assert.deepEqual(a, b);
    assert.equal(a.validation.length, 4);
    assert.ok(a.train.every((r) => r.ids.length === 8));
    const straight = new BatchStream(a.train, 3, 9);
    const first = Array.from({ length: 7 }, () => straight.next());
    const resumed = new BatchStream(a.train, 3, 9);
    for (let i = 0; i < 4; i++) resumed.next();
    const again = new BatchStream(a.train, 3, 0, resumed.state());
    assert.deepEqual([0, 1, 2].map(() => again.next()), first.slice(4));
    assert.ok(straight.epoch >= 1, 'seven batches of three from sixteen rows cross an epoch');
  });
});
