// The embedded federation store: <state>/federations/<id>.json, each rewritten atomically
// (json-file.ts), one write at a time per federation. The folder is made on the first save:
// a node with no federations leaves no trace in its state directory.
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { KeyedWriteQueue, readJsonState, writeJsonState } from '../state/json-file.ts';
import { CoordinatorError } from './errors.ts';
import { isFederationRecord } from './federation-record.ts';
import type { FederationRecord } from './federation-record.ts';
import type { FederationStore } from './federation-store.ts';

export const FEDERATIONS_DIR = 'federations';

export class DirectoryFederationStore implements FederationStore {
  readonly shared = false;
  readonly #dir: string;
  readonly #writes = new KeyedWriteQueue();

  constructor(stateDir: string) {
    this.#dir = join(stateDir, FEDERATIONS_DIR);
  }

  async load(): Promise<FederationRecord[]> {
    const names = await readdir(this.#dir).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return [] as string[];
      throw error;
    });
    const records: FederationRecord[] = [];
    for (const name of names) {
      if (!name.endsWith('.json')) continue;
      const file = join(this.#dir, name);
      const raw: unknown = await readJsonState(file);
      if (!isFederationRecord(raw)) throw new CoordinatorError('TANDEM_FED_STATE_INVALID', { file, reason: 'not a federation record' });
      records.push(raw);
    }
    return records;
  }

  save(record: FederationRecord): Promise<void> {
    const id = record.config.id;
    return this.#writes.run(id, async () => {
      await mkdir(this.#dir, { recursive: true });
      await writeJsonState(join(this.#dir, `${id}.json`), record);
    });
  }

  close(): void {
    // Nothing held open: every write has its own file handle.
  }
}
