// Files on disk are hostile too (found by fuzzing the loaders): a named pipe in place of
// config.json, tokenizer.json, a data file, an adapter's weights or trainer_state.json blocked the
// read for good (the pipe's open holding a thread of libuv's pool), /dev/zero read until memory ran
// out, and a checkpoint's negative data position resumed a stream of empty batches. Each is now
// refused, typed and naming the file, before it is read.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cp, mkdtemp, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ModelError, loadModelFolder, loadTokenizer, readDataset, readSafetensorsFile } from '../../model/index.ts';
import { CHECKPOINT_VERSION, TRAINER_STATE_FILE, readTrainingCheckpoint } from '../../model/train/index.ts';

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
let work = '';
before(async () => {
  work = await mkdtemp(join(tmpdir(), 'tandem-hostile-files-'));
});
after(() => rm(work, { recursive: true, force: true }));

/** A copy of the fixture whose `name` is replaced by `make(path)`. */
async function folderWith(label: string, name: string, make: (path: string) => Promise<void>): Promise<string> {
  const dir = join(work, label);
  await cp(FIXTURE, dir, { recursive: true });
  await rm(join(dir, name), { force: true });
  await make(join(dir, name));
  return dir;
}

const fifo = async (path: string): Promise<void> => { execFileSync('mkfifo', [path]); };
const devZero = (path: string): Promise<void> => symlink('/dev/zero', path);
const unreadable = (file: string, reason: RegExp) => (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_MODEL_FILE_UNREADABLE' && (e.file ?? '').endsWith(file) && reason.test(e.message);

describe('hostile files on disk', () => {
  it('a named pipe or /dev/zero as config.json or tokenizer.json, and a config.json over 16 MiB, are refused before they are read', async () => {
    for (const [label, make] of [['fifo', fifo], ['zero', devZero]] as const) {
      await assert.rejects(loadModelFolder(await folderWith(`config-${label}`, 'config.json', make)), unreadable('config.json', /not a regular file/));
      await assert.rejects(loadTokenizer(await folderWith(`tokenizer-${label}`, 'tokenizer.json', make)), unreadable('tokenizer.json', /not a regular file/));
    }
    const big = await folderWith('config-big', 'config.json', async (path) => {
      await writeFile(path, '{}');
      await truncate(path, 17 * 1024 * 1024);
    });
    await assert.rejects(loadModelFolder(big), unreadable('config.json', /over the limit of 16777216/));
  });

  it('a named pipe as a data file or as safetensors weights is refused without blocking', async () => {
    const data = join(work, 'data.jsonl');
    await fifo(data);
    await assert.rejects(readDataset(data), unreadable('data.jsonl', /not a regular file/));
    const weights = join(work, 'adapter_model.safetensors');
    await fifo(weights);
    await assert.rejects(readSafetensorsFile(weights), unreadable('adapter_model.safetensors', /not a regular file/));
  });

  it('trainer_state.json as a named pipe, or with a negative data position or epoch, is TANDEM_CHECKPOINT_INVALID', async () => {
    const invalid = (reason: RegExp) => (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_CHECKPOINT_INVALID' && reason.test(e.message);
    const piped = join(work, 'ckpt-fifo');
    await folderWith('ckpt-fifo', TRAINER_STATE_FILE, fifo);
    await assert.rejects(readTrainingCheckpoint(piped), invalid(/not a regular file/));
    for (const [label, data] of [['position', { epoch: 0, position: -3 }], ['epoch', { epoch: -2, position: 0 }]] as const) {
      const dir = join(work, `ckpt-${label}`);
      await folderWith(`ckpt-${label}`, TRAINER_STATE_FILE, (path) => writeFile(path, JSON.stringify({
        version: CHECKPOINT_VERSION, step: 1, optimizer: { kind: 'adamw', step: 1 }, data: { ...data, epochRng: [1, 2, 3, 4] }, run: {},
      })));
      await assert.rejects(readTrainingCheckpoint(dir), invalid(/non-negative integers/), label);
    }
  });
});
