// JSON state files: read with validation, written atomically (temporary file, fsync, rename,
// fsync of the folder), readable by the node's user only (0600 in a 0700 folder).
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, readdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { CloudError } from '../errors.ts';

export const STATE_DIR_MODE = 0o700;
export const STATE_FILE_MODE = 0o600;
/** Temporary files are `<name>.tmp-<pid>-<hex>`; a hard kill can leave one behind. */
const TEMP_PATTERN = /\.tmp-\d+-[0-9a-f]+$/;

/** The parsed file, or undefined when it does not exist yet. Anything unreadable is TANDEM_STATE_INVALID. */
export async function readJsonState(path: string): Promise<Record<string, unknown> | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (cause) {
    if ((cause as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new CloudError('TANDEM_STATE_INVALID', { file: path, reason: (cause as Error).message }, { cause });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (cause) {
    throw new CloudError('TANDEM_STATE_INVALID', { file: path, reason: `not JSON: ${(cause as Error).message}` }, { cause });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new CloudError('TANDEM_STATE_INVALID', { file: path, reason: 'the file must hold a JSON object' });
  }
  return value as Record<string, unknown>;
}

/** Writes `value` as JSON to `path` atomically with mode 0600; durable once it resolves. */
export async function writeJsonState(path: string, value: unknown): Promise<void> {
  await writeStateFile(path, `${JSON.stringify(value, null, 2)}\n`);
}

/** Writes a state file atomically and durably (a temporary file, fsync, rename, the folder fsynced). */
export async function writeStateFile(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await open(tmp, 'w', STATE_FILE_MODE);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (cause) {
    await rm(tmp, { force: true });
    // The temporary path is ours, not the caller's business: the message names the state file.
    throw new CloudError('TANDEM_INTERNAL', { reason: `state file ${basename(path)} could not be written: ${(cause as NodeJS.ErrnoException).code ?? 'error'}` }, { cause });
  }
  await syncDir(dirname(path));
}

/** Makes renames and unlinks in `dir` durable; not every platform lets a directory be fsynced. */
export async function syncDir(dir: string): Promise<void> {
  try {
    const dh = await open(dir, 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  } catch {
    // best effort
  }
}

/** Creates `dir` (and its parents) if needed and makes it 0700. */
export async function ensureStateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: STATE_DIR_MODE });
  await chmod(dir, STATE_DIR_MODE);
}

/**
 * Removes the temporary files a hard kill left in `dir` and makes the state files there
 * 0600 (files written by older builds were 0644). Returns the names removed.
 */
export async function tidyStateDir(dir: string, stateFiles: readonly string[] = []): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (cause) {
    if ((cause as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw cause;
  }
  const removed: string[] = [];
  for (const name of names) {
    if (TEMP_PATTERN.test(name)) {
      await rm(join(dir, name), { force: true, recursive: true });
      removed.push(name);
    } else if (stateFiles.includes(name) || name.endsWith('.json')) {
      await chmod(join(dir, name), STATE_FILE_MODE).catch(() => undefined);
    }
  }
  return removed;
}

/** Runs writes one after another, so a later state never lands before an earlier one. */
export class WriteQueue {
  #tail: Promise<void> = Promise.resolve();
  #pending = 0;

  run(write: () => Promise<void>): Promise<void> {
    this.#pending += 1;
    const next = this.#tail.then(write).finally(() => { this.#pending -= 1; });
    this.#tail = next.catch(() => undefined);
    return next;
  }

  get idle(): boolean {
    return this.#pending === 0;
  }
}

/** A WriteQueue per key (a session, a federation): writes of one key in order, a key's queue gone once idle. */
export class KeyedWriteQueue {
  readonly #queues = new Map<string, WriteQueue>();

  async run(key: string, write: () => Promise<void>): Promise<void> {
    let queue = this.#queues.get(key);
    if (queue === undefined) {
      queue = new WriteQueue();
      this.#queues.set(key, queue);
    }
    try {
      await queue.run(write);
    } finally {
      if (queue.idle && this.#queues.get(key) === queue) this.#queues.delete(key);
    }
  }
}
