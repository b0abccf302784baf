// Federations in the JetStream key-value bucket `tandem-federations` (one entry per federation,
// JSON), for the gateways of a cluster. Each save is a compare-and-set on the revision this
// gateway last wrote or saw, so two gateways never overwrite each other's rounds: the loser
// gets TANDEM_FED_STATE_CONFLICT (nothing acknowledged) and, by the watch, the winner's
// record. An entry carries its writer's id, so a gateway skips the echo of its own saves.
import { randomUUID } from 'node:crypto';
import { Kvm } from '@nats-io/kv';
import type { KV, KvEntry } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { WriteQueue } from '../state/json-file.ts';
import { CoordinatorError } from './errors.ts';
import { isFederationRecord } from './federation-record.ts';
import type { FederationRecord } from './federation-record.ts';
import type { FederationStore } from './federation-store.ts';

export const FEDERATIONS_BUCKET = 'tandem-federations';

interface Entry {
  writer: string;
  record: FederationRecord;
}

export class JetStreamFederationStore implements FederationStore {
  readonly #kv: KV;
  readonly #nc: NatsConnection;
  readonly #writer = randomUUID();
  /** The revision of each federation's entry as this gateway last wrote or saw it. */
  readonly #revisions = new Map<string, number>();
  readonly #writes = new Map<string, WriteQueue>();
  readonly #onInvalid?: (key: string) => void;
  #stop: (() => void) | undefined;
  onRemoteChange?: (record: FederationRecord) => void;

  private constructor(nc: NatsConnection, kv: KV, onInvalid?: (key: string) => void) {
    this.#nc = nc;
    this.#kv = kv;
    this.#onInvalid = onInvalid;
  }

  /** File storage (survives a nats-server restart), `replicas` copies in a JetStream cluster (1). */
  static async open(nc: NatsConnection, options: { replicas?: number; onInvalid?: (key: string) => void } = {}): Promise<JetStreamFederationStore> {
    const kv = await new Kvm(nc).create(FEDERATIONS_BUCKET, { history: 1, replicas: options.replicas ?? 1, storage: 'file' });
    return new JetStreamFederationStore(nc, kv, options.onInvalid);
  }

  #parse(entry: KvEntry): Entry | undefined {
    try {
      const value = JSON.parse(Buffer.from(entry.value).toString('utf8')) as Partial<Entry>;
      if (typeof value.writer === 'string' && isFederationRecord(value.record) && value.record.config.id === entry.key) return value as Entry;
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
    void (async () => {
      for await (const e of watch) {
        if (e.operation !== 'PUT' || e.revision <= (this.#revisions.get(e.key) ?? 0)) continue;
        const entry = this.#parse(e);
        if (entry === undefined) continue;
        this.#revisions.set(e.key, e.revision);
        if (entry.writer !== this.#writer) this.onRemoteChange?.(entry.record);
      }
    })().catch(() => undefined);
    const records: FederationRecord[] = [];
    for await (const key of await this.#kv.keys()) {
      const e = await this.#kv.get(key);
      if (e === null || e.operation !== 'PUT') continue;
      const entry = this.#parse(e);
      if (entry === undefined) continue;
      if (e.revision > (this.#revisions.get(key) ?? 0)) this.#revisions.set(key, e.revision);
      records.push(entry.record);
    }
    return records;
  }

  save(record: FederationRecord): Promise<void> {
    const id = record.config.id;
    let q = this.#writes.get(id);
    if (!q) this.#writes.set(id, (q = new WriteQueue()));
    return q.run(async () => {
      const data = JSON.stringify({ writer: this.#writer, record } satisfies Entry);
      const limit = this.#nc.info?.max_payload ?? Number.POSITIVE_INFINITY;
      const bytes = Buffer.byteLength(data);
      if (bytes > limit - 1024) throw new CoordinatorError('TANDEM_FED_STATE_TOO_LARGE', { federation: id, bytes, limit });
      const known = this.#revisions.get(id);
      try {
        const revision = known === undefined ? await this.#kv.create(id, data) : await this.#kv.update(id, data, known);
        if (revision > (this.#revisions.get(id) ?? 0)) this.#revisions.set(id, revision);
      } catch (cause) {
        if (/wrong last sequence|key exists/i.test((cause as Error).message)) throw new CoordinatorError('TANDEM_FED_STATE_CONFLICT', { federation: id, revision: known ?? 0 });
        throw cause;
      }
    });
  }

  close(): void {
    this.#stop?.();
  }
}
