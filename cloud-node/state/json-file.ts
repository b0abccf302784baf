// JSON state files: read with validation, written atomically (temporary file, then rename).
import { readFile } from 'node:fs/promises';
import { writeFileAtomic } from '../../model/index.ts';
import { CloudError } from '../errors.ts';

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

export async function writeJsonState(path: string, value: unknown): Promise<void> {
  await writeFileAtomic(path, `${JSON.stringify(value, null, 2)}\n`);
}

/** Runs writes one after another, so a later state never lands before an earlier one. */
export class WriteQueue {
  #tail: Promise<void> = Promise.resolve();

  run(write: () => Promise<void>): Promise<void> {
    const next = this.#tail.then(write);
    this.#tail = next.catch(() => undefined);
    return next;
  }
}
