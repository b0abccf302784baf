// A cluster's stored files in the JetStream object store `tandem-files`: the folders a gateway
// keeps under its state directory (served adapters, emulator bundles) are published there, one
// object per file named by its path under the state directory, and a gateway that starts
// restores them into its own state directory before its registries read it. The registries
// keep working on their folders (the embedded store of one process); the object store is what
// the gateways share and what outlives any of them.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, stat, writeFile } from 'node:fs/promises';
import { dirname, join, relative, sep } from 'node:path';
import { Objm, StorageType } from '@nats-io/obj';
import type { ObjectStore } from '@nats-io/obj';
import type { NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { STATE_DIR_MODE, STATE_FILE_MODE } from './json-file.ts';

export const FILES_BUCKET = 'tandem-files';
/** A path segment of a stored file: no dot files (staging folders), no `..`. */
const SEGMENT = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;
const MAX_DEPTH = 6;
/** The largest file restored (an adapter's weights, an emulator's blocks). */
export const MAX_MIRRORED_FILE_BYTES = 2 * 1024 * 1024 * 1024;

/** `path` relative to the state directory, when every segment is one a stored file may have. */
export function mirroredName(path: string): string | undefined {
  const parts = path.split('/');
  return parts.length >= 2 && parts.length <= MAX_DEPTH && parts.every((p) => SEGMENT.test(p)) ? parts.join('/') : undefined;
}

/** A file's digest as the object store writes it ("SHA-256=" and base64url), without padding. */
async function digestOf(path: string): Promise<string> {
  return `SHA-256=${createHash('sha256').update(await readFile(path)).digest('base64url')}`;
}

export class JetStreamFileMirror {
  readonly #store: ObjectStore;
  readonly #stateDir: string;
  readonly #nc: NatsConnection;
  /** The object store's calls not yet finished (each list is a JetStream consumer of its own). */
  readonly #inFlight = new Set<Promise<unknown>>();
  readonly #watches = new Set<() => void>();
  #closed = false;

  private constructor(nc: NatsConnection, store: ObjectStore, stateDir: string) {
    this.#nc = nc;
    this.#store = store;
    this.#stateDir = stateDir;
  }

  /** File storage (survives a nats-server restart), `replicas` copies in a JetStream cluster (1). */
  static async open(nc: NatsConnection, stateDir: string, options: { replicas?: number } = {}): Promise<JetStreamFileMirror> {
    const store = await new Objm(nc).create(FILES_BUCKET, { storage: StorageType.File, replicas: options.replicas ?? 1 });
    return new JetStreamFileMirror(nc, store, stateDir);
  }

  /**
   * Writes into the state directory every stored file under `folder` (relative, `/`-separated)
   * that it lacks or holds with another size; returns the names written. A name that is not a
   * plain relative path, or an object over MAX_MIRRORED_FILE_BYTES, is skipped and reported.
   */
  restore(folder: string, onInvalid?: (name: string, reason: string) => void): Promise<string[]> {
    return this.#track(() => this.#restore(folder, onInvalid));
  }

  async #restore(folder: string, onInvalid?: (name: string, reason: string) => void): Promise<string[]> {
    const written: string[] = [];
    for (const info of await this.#store.list()) {
      if (info.deleted || !info.name.startsWith(`${folder}/`)) continue;
      const name = mirroredName(info.name);
      if (name === undefined) {
        onInvalid?.(info.name.slice(0, 200), 'not a relative path of plain segments');
        continue;
      }
      if (info.size > MAX_MIRRORED_FILE_BYTES) {
        onInvalid?.(name, `${info.size} bytes; the limit is ${MAX_MIRRORED_FILE_BYTES}`);
        continue;
      }
      const path = join(this.#stateDir, ...name.split('/'));
      // A file of the same size is the same file only if its digest matches (a name deleted and stored again).
      const held = await stat(path).then((s) => s.size, () => -1);
      if (held === info.size && (await digestOf(path)) === info.digest.replace(/=+$/, '')) continue;
      const data = await this.#store.getBlob(name);
      if (data === null || data.byteLength !== info.size) {
        onInvalid?.(name, 'could not be read whole');
        continue;
      }
      await mkdir(dirname(path), { recursive: true, mode: STATE_DIR_MODE });
      const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
      await writeFile(tmp, data, { mode: STATE_FILE_MODE });
      await rename(tmp, path);
      written.push(name);
    }
    return written;
  }

  /** Stores every file of `dir` (a folder inside the state directory), replacing what was stored under it. */
  publish(dir: string): Promise<void> {
    return this.#track(() => this.#publish(dir));
  }

  async #publish(dir: string): Promise<void> {
    const folder = this.#nameOf(dir);
    // Sorted, so that a folder's record.json (after adapter_*) is stored last: a watcher that
    // takes the folder in on its record finds every other file already there.
    const files = (await this.#filesOf(dir)).sort();
    const names = new Set<string>();
    for (const file of files) {
      const name = this.#nameOf(file);
      names.add(name);
      try {
        await this.#store.putBlob({ name }, new Uint8Array(await readFile(file)));
      } catch (cause) {
        throw new CloudError('TANDEM_INTERNAL', { reason: `storing ${name} in the object store ${FILES_BUCKET} failed: ${(cause as Error).message}` }, { cause });
      }
    }
    for (const info of await this.#store.list()) if (!info.deleted && info.name.startsWith(`${folder}/`) && !names.has(info.name)) await this.#store.delete(info.name);
  }

  /** Removes what is stored under `dir` (a folder inside the state directory). */
  remove(dir: string): Promise<void> {
    return this.#track(async () => {
      const folder = this.#nameOf(dir);
      for (const info of await this.#store.list()) if (!info.deleted && info.name.startsWith(`${folder}/`)) await this.#store.delete(info.name);
    });
  }

  /**
   * Stops following and waits for the calls in flight; later calls are refused with
   * TANDEM_NODE_CLOSING. Call it before the connection drains: @nats-io/jetstream 3.4 starts
   * an ordered consumer's heartbeat monitor (a 30 s setInterval) before it subscribes, and a
   * subscribe refused by a draining or closed connection leaves that interval running for ever —
   * a list() caught by the drain held the process open and logged ClosedConnectionError every
   * 30 s.
   */
  async close(): Promise<void> {
    this.#closed = true;
    for (const stop of this.#watches) stop();
    this.#watches.clear();
    await Promise.allSettled([...this.#inFlight]);
  }

  #track<T>(call: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new CloudError('TANDEM_NODE_CLOSING', { reason: `the object store ${FILES_BUCKET} is being closed` }));
    const running = call();
    this.#inFlight.add(running);
    void running.then(() => this.#inFlight.delete(running), () => this.#inFlight.delete(running));
    return running;
  }

  #nameOf(path: string): string {
    const name = mirroredName(relative(this.#stateDir, path).split(sep).join('/'));
    if (name === undefined) throw new CloudError('TANDEM_INTERNAL', { reason: `${path} is not a folder of plain names inside the state directory` });
    return name;
  }

  async #filesOf(dir: string, depth = 0): Promise<string[]> {
    if (depth > MAX_DEPTH) return [];
    const out: string[] = [];
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) out.push(...(await this.#filesOf(path, depth + 1)));
      else if (entry.isFile()) out.push(path);
    }
    return out;
  }

  /**
   * Follows what other writers store or delete under `folder` while this one runs: `onFile`
   * with each stored file's name once it is restored here, `onDeleted` with each deleted name.
   * Returns the function that stops following; a closed connection stops it too (the watch's
   * heartbeat monitor would otherwise try to re-create its consumer on a closed connection).
   */
  async watch(folder: string, on: { onFile: (name: string) => Promise<void>; onDeleted: (name: string) => Promise<void>; onError?: (error: Error) => void }): Promise<() => void> {
    const updates = await this.#track(() => this.#store.watch({ includeHistory: false }));
    const stop = (): void => {
      this.#watches.delete(stop);
      updates.stop();
    };
    this.#watches.add(stop);
    if (this.#closed) stop();
    void (async () => {
      for await (const info of updates) {
        if (this.#closed) break;
        if (!info.name.startsWith(`${folder}/`)) continue;
        const name = mirroredName(info.name);
        if (name === undefined) continue;
        try {
          if (info.deleted) await on.onDeleted(name);
          else {
            await this.restore(name.split('/').slice(0, -1).join('/'));
            await on.onFile(name);
          }
        } catch (error) {
          on.onError?.(error as Error);
        }
      }
    })().catch(() => undefined);
    void this.#nc.closed().then(stop);
    return stop;
  }

  /** Names of the stored files under `folder`, sorted. */
  async names(folder: string): Promise<string[]> {
    return (await this.#track(() => this.#store.list())).filter((i) => !i.deleted && i.name.startsWith(`${folder}/`)).map((i) => i.name).sort();
  }
}
