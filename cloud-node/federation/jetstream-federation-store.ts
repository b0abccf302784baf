// Federations in the JetStream key-value bucket `tandem-federations` (one entry per federation,
// JSON), for the gateways of a cluster. Each save is a compare-and-set on the revision this
// gateway last wrote or saw, so two gateways never overwrite each other's rounds: the loser
// gets TANDEM_FED_STATE_CONFLICT (nothing acknowledged) and, by the watch, the winner's
// record. An entry carries its writer's id, so a gateway skips the echo of its own saves.
// A record larger than max_payload (a big adapter, many updates in) goes to the object store
// `tandem-federation-records` under a name of its own, and the entry names it: the
// compare-and-set stays on the small entry.
import { randomUUID } from 'node:crypto';
import { Kvm } from '@nats-io/kv';
import { Objm, StorageType } from '@nats-io/obj';
import type { ObjectStore } from '@nats-io/obj';
import type { KV, KvEntry } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { KeyedWriteQueue } from '../state/json-file.ts';
import { CoordinatorError } from './errors.ts';
import { isFederationRecord } from './federation-record.ts';
import type { FederationRecord } from './federation-record.ts';
import type { FederationStore } from './federation-store.ts';

export const FEDERATIONS_BUCKET = 'tandem-federations';
export const LARGE_FEDERATIONS_BUCKET = 'tandem-federation-records';
/** The largest record read back from the object store. */
export const MAX_FEDERATION_RECORD_BYTES = 1024 * 1024 * 1024;
const OBJECT_NAME = /^[a-z0-9][a-z0-9_-]{0,63}\.[0-9a-f-]{36}$/;

interface Entry {
  writer: string;
  record: FederationRecord;
  /** The object holding the record, when it is in the object store. */
  object?: string;
}

/** What the bucket holds: the entry itself, or the name of the object that holds it. */
interface StoredEntry {
  writer: string;
  record?: FederationRecord;
  object?: string;
}

export class JetStreamFederationStore implements FederationStore {
  readonly shared = true;
  readonly #kv: KV;
  readonly #nc: NatsConnection;
  readonly #writer = randomUUID();
  /** The revision of each federation's entry as this gateway last wrote or saw it. */
  readonly #revisions = new Map<string, number>();
  readonly #writes = new KeyedWriteQueue();
  readonly #onInvalid?: (key: string) => void;
  readonly #replicas: number;
  #large: Promise<ObjectStore> | undefined;
  /** The object each federation's entry names, when its record is in the object store. */
  readonly #objects = new Map<string, string>();
  #stop: (() => void) | undefined;
  #closed = false;
  onRemoteChange?: (record: FederationRecord) => void;

  private constructor(nc: NatsConnection, kv: KV, replicas: number, onInvalid?: (key: string) => void) {
    this.#nc = nc;
    this.#kv = kv;
    this.#replicas = replicas;
    this.#onInvalid = onInvalid;
  }

  #largeStore(): Promise<ObjectStore> {
    this.#large ??= new Objm(this.#nc).create(LARGE_FEDERATIONS_BUCKET, { storage: StorageType.File, replicas: this.#replicas }).catch((error: unknown) => {
      this.#large = undefined;
      throw error;
    });
    return this.#large;
  }

  /** File storage (survives a nats-server restart), `replicas` copies in a JetStream cluster (1). */
  static async open(nc: NatsConnection, options: { replicas?: number; onInvalid?: (key: string) => void } = {}): Promise<JetStreamFederationStore> {
    const kv = await new Kvm(nc).create(FEDERATIONS_BUCKET, { history: 1, replicas: options.replicas ?? 1, storage: 'file' });
    const store = new JetStreamFederationStore(nc, kv, options.replicas ?? 1, options.onInvalid);
    // A closed connection ends the watch (its heartbeat monitor would retry on a closed connection).
    void nc.closed().then(() => store.close());
    return store;
  }

  async #parse(entry: KvEntry): Promise<Entry | undefined> {
    try {
      const value = JSON.parse(Buffer.from(entry.value).toString('utf8')) as Partial<StoredEntry>;
      if (typeof value.writer === 'string' && typeof value.object === 'string' && OBJECT_NAME.test(value.object) && value.object.startsWith(`${entry.key}.`)) {
        const store = await this.#largeStore();
        const info = await store.info(value.object);
        if (info !== null && !info.deleted && info.size <= MAX_FEDERATION_RECORD_BYTES) {
          const bytes = await store.getBlob(value.object);
          const record: unknown = bytes === null ? undefined : JSON.parse(Buffer.from(bytes).toString('utf8'));
          if (isFederationRecord(record) && record.config.id === entry.key) return { writer: value.writer, record, object: value.object };
        }
      } else if (typeof value.writer === 'string' && isFederationRecord(value.record) && value.record.config.id === entry.key) {
        return { writer: value.writer, record: value.record };
      }
    } catch {
      // reported below
    }
    this.#onInvalid?.(entry.key);
    return undefined;
  }

  async load(): Promise<FederationRecord[]> {
    // The watch first, then the load: a save in between is seen by both, and applied once (revisions).
    const watch = await this.#kv.watch({ include: 'updates' });
    this.#stop = () => watch.stop();
    if (this.#closed) watch.stop();
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== 'PUT' || e.revision <= (this.#revisions.get(e.key) ?? 0)) continue;
        const entry = await this.#parse(e);
        if (entry === undefined || e.revision <= (this.#revisions.get(e.key) ?? 0)) continue;
        this.#revisions.set(e.key, e.revision);
        this.#named(e.key, entry.object);
        if (entry.writer !== this.#writer) this.onRemoteChange?.(entry.record);
      }
    })().catch(() => undefined);
    const records: FederationRecord[] = [];
    try {
      for await (const key of await this.#kv.keys()) {
        const e = await this.#kv.get(key);
        if (e === null || e.operation !== 'PUT') continue;
        const entry = await this.#parse(e);
        if (entry === undefined) continue;
        if (e.revision > (this.#revisions.get(key) ?? 0)) {
          this.#revisions.set(key, e.revision);
          this.#named(key, entry.object);
        }
        records.push(entry.record);
      }
    } catch (error) {
      // A load that fails leaves no watch behind.
      watch.stop();
      throw error;
    }
    return records;
  }

  save(record: FederationRecord): Promise<void> {
    const id = record.config.id;
    return this.#writes.run(id, async () => {
      const limit = this.#nc.info?.max_payload ?? Number.POSITIVE_INFINITY;
      let data = JSON.stringify({ writer: this.#writer, record } satisfies StoredEntry);
      let object: string | undefined;
      if (Buffer.byteLength(data) > limit - 1024) {
        const bytes = Buffer.byteLength(data);
        if (bytes > MAX_FEDERATION_RECORD_BYTES) throw new CoordinatorError('TANDEM_FED_STATE_TOO_LARGE', { federation: id, bytes, limit: MAX_FEDERATION_RECORD_BYTES });
        object = `${id}.${randomUUID()}`;
        await (await this.#largeStore()).putBlob({ name: object }, new TextEncoder().encode(JSON.stringify(record)));
        data = JSON.stringify({ writer: this.#writer, object } satisfies StoredEntry);
      }
      const known = this.#revisions.get(id);
      const previous = this.#objects.get(id);
      try {
        const revision = known === undefined ? await this.#kv.create(id, data) : await this.#kv.update(id, data, known);
        if (revision > (this.#revisions.get(id) ?? 0)) this.#revisions.set(id, revision);
      } catch (cause) {
        if (object !== undefined) await this.#deleteObject(object);
        if (/wrong last sequence|key exists/i.test((cause as Error).message)) throw new CoordinatorError('TANDEM_FED_STATE_CONFLICT', { federation: id, revision: known ?? 0 });
        throw cause;
      }
      this.#named(id, object);
      // The record this entry replaced, when it was in the object store, is no longer named.
      if (previous !== undefined && previous !== object) await this.#deleteObject(previous);
    });
  }

  #named(id: string, object: string | undefined): void {
    if (object === undefined) this.#objects.delete(id);
    else this.#objects.set(id, object);
  }

  async #deleteObject(name: string): Promise<void> {
    await (await this.#largeStore()).delete(name).catch(() => undefined);
  }

  close(): void {
    this.#closed = true;
    this.#stop?.();
  }
}
