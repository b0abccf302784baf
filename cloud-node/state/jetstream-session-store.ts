// Session records in the JetStream bucket `tandem-sessions` (one entry per session, JSON),
// for the gateways of a cluster: a session welcomed by one gateway is known to every other,
// so an edge whose gateway died reattaches on another (SessionOpen). Writes are acknowledged
// by JetStream before the reply goes out, as the directory store fsyncs.
import type { NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { JetStreamBucket } from './jetstream-bucket.ts';
import type { Caller } from './key-store.ts';
import type { SessionRecords } from './session-records.ts';
import { isSessionRecord } from './session-store.ts';
import type { SessionRecord } from './session-store.ts';

export const SESSIONS_BUCKET = 'tandem-sessions';

export class JetStreamSessionStore implements SessionRecords {
  readonly #bucket: JetStreamBucket<SessionRecord>;
  readonly #openByTenant: Map<string, number>;

  private constructor(bucket: JetStreamBucket<SessionRecord>, openByTenant: Map<string, number>) {
    this.#bucket = bucket;
    this.#openByTenant = openByTenant;
  }

  static async open(nc: NatsConnection, options: { replicas?: number; onInvalid?: (key: string) => void } = {}): Promise<JetStreamSessionStore> {
    const openByTenant = new Map<string, number>();
    const count = (tenant: string, delta: number): void => {
      const n = (openByTenant.get(tenant) ?? 0) + delta;
      if (n <= 0) openByTenant.delete(tenant);
      else openByTenant.set(tenant, n);
    };
    // Snapshots of what was counted, since records are changed in place before a put.
    const counted = new Map<string, string>();
    const bucket = await JetStreamBucket.open<SessionRecord>(nc, SESSIONS_BUCKET, {
      replicas: options.replicas,
      parse: (value, key) => (isSessionRecord(value) && value.id === key ? value : undefined),
      onInvalid: options.onInvalid,
      onChange: (key, _before, after) => {
        const was = counted.get(key);
        if (was !== undefined) count(was, -1);
        counted.delete(key);
        if (after?.state === 'open') {
          count(after.tenant, 1);
          counted.set(key, after.tenant);
        }
      },
    });
    return new JetStreamSessionStore(bucket, openByTenant);
  }

  list(caller: Caller): SessionRecord[] {
    return [...this.#bucket.values()].filter((s) => caller.admin || s.tenant === caller.tenant);
  }

  all(): IterableIterator<SessionRecord> {
    return this.#bucket.values();
  }

  get size(): number {
    return this.#bucket.size;
  }

  get openCount(): number {
    let n = 0;
    for (const c of this.#openByTenant.values()) n += c;
    return n;
  }

  openCountOf(tenant: string): number {
    return this.#openByTenant.get(tenant) ?? 0;
  }

  get(caller: Caller, id: string): SessionRecord {
    const s = this.#bucket.get(id);
    if (s === undefined || (!caller.admin && s.tenant !== caller.tenant)) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
    return s;
  }

  getOpen(caller: Caller, id: string): SessionRecord {
    const s = this.get(caller, id);
    if (s.state !== 'open') throw new CloudError('TANDEM_SESSION_CLOSED', { session: id });
    return s;
  }

  async add(record: SessionRecord): Promise<void> {
    await this.#bucket.put(record.id, record);
  }

  async update(id: string, change: (s: SessionRecord) => void): Promise<SessionRecord> {
    const s = this.#bucket.get(id);
    if (s === undefined) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
    const next = structuredClone(s);
    change(next);
    next.updatedAt = new Date().toISOString();
    // The bucket changes `s` in place once JetStream has the record: its holders see it.
    await this.#bucket.put(id, next);
    return s;
  }

  async remove(id: string): Promise<void> {
    const s = this.#bucket.get(id);
    if (s === undefined) return;
    if (s.state === 'open') throw new CloudError('TANDEM_INTERNAL', { reason: `session ${id} is open; close it before removing it` });
    await this.#bucket.delete(id);
  }

  close(): void {
    this.#bucket.close();
  }
}
