import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import { ModelError } from '../../model/index.ts';
import type { ModelErrorCode } from '../../model/index.ts';

export const STORIES_DIR = join(import.meta.dirname, '..', 'fixtures', 'stories260K');

function check(err: unknown, code: ModelErrorCode, mentions: string[]): true {
  assert.ok(err instanceof ModelError, `expected a ModelError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  for (const m of mentions) assert.ok(err.message.includes(m), `message should name ${JSON.stringify(m)}: ${err.message}`);
  return true;
}

/** Asserts that `fn` throws a ModelError with `code` whose message names every one of `mentions`. */
export function throwsModelError(fn: () => unknown, code: ModelErrorCode, ...mentions: string[]): void {
  assert.throws(fn, (err: unknown) => check(err, code, mentions));
}

export async function rejectsModelError(p: Promise<unknown>, code: ModelErrorCode, ...mentions: string[]): Promise<void> {
  await assert.rejects(p, (err: unknown) => check(err, code, mentions));
}

const dirs: string[] = [];
after(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

/** A fresh temporary directory, removed when the test file ends. */
export async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'tandem-model-test-'));
  dirs.push(d);
  return d;
}
