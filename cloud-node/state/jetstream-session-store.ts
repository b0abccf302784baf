// Session records in the JetStream bucket `tandem-sessions` (one entry per session, JSON),
// for the gateways of a cluster: a session welcomed by one gateway is known to every other,
// so an edge whose gateway died reattaches on another (SessionOpen). Writes are acknowledged
// by JetStream before the reply goes out, as the directory store fsyncs.
import type { NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { KeyedWriteQueue } from './json-file.ts';
import { JetStreamBucket } from './jetstream-bucket.ts';
import type { JetStreamStateOptions } from './jetstream-bucket.ts';
import type { Caller } from './key-store.ts';
import { OpenSessionCounts, sessionFor, visibleTo } from './session-access.ts';
import type { SessionRecords } from './session-records.ts';
import { isSessionRecord } from './session-store.ts';
import type { SessionRecord } from './session-store.ts';

export const SESSIONS_BUCKET = 'tandem-sessions';

export class JetStreamSessionStore implements SessionRecords {
  readonly #bucket: JetStreamBucket<SessionRecord>;
  /** Updates in flight, per session: run in order. */
  readonly #updates = new KeyedWriteQueue();
  readonly #open: OpenSessionCounts;

  private constructor(bucket: JetStreamBucket<SessionRecord>, open: OpenSessionCounts) {
    this.#bucket = bucket;
    this.#open = open;
  }

  static async open(nc: NatsConnection, options: JetStreamStateOptions = {}): Promise<JetStreamSessionStore> {
    const open = new OpenSessionCounts();
    const count = (tenant: string, delta: number): void => open.add(tenant, delta);
    // Snapshots of what was counted, since records are changed in place before a put.
    const counted = new Map<string, string>();
    const bucket = await JetStreamBucket.open<SessionRecord>(nc, SESSIONS_BUCKET, {
      replicas: options.replicas,
      parse: (value, key) => (isSessionRecord(value) && value.id === key ? value : undefined),
      onInvalid: options.onInvalid,
      onWatch: (state, reason) => options.onWatch?.(SESSIONS_BUCKET, state, reason),
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
    return new JetStreamSessionStore(bucket, open);
  }

  list(caller: Caller): SessionRecord[] {
    return [...this.#bucket.values()].filter((s) => visibleTo(caller, s));
  }

  all(): IterableIterator<SessionRecord> {
    return this.#bucket.values();
  }

  get size(): number {
    return this.#bucket.size;
  }

  get openCount(): number {
    return this.#open.total;
  }

  openCountOf(tenant: string): number {
    return this.#open.of(tenant);
  }

  get(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#bucket.get(id));
  }

  getOpen(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#bucket.get(id), true);
  }

  async add(record: SessionRecord): Promise<void> {
    await this.#bucket.put(record.id, record);
  }

  /**
   * Updates of one session run one after another, each on the record as the one before left
   * it: a step's update behind a close must not write back the session as open, nor a lower
   * step over a higher one.
   */
  async update(id: string, change: (s: SessionRecord) => void): Promise<SessionRecord> {
    let updated: SessionRecord | undefined;
    await this.#updates.run(id, async () => {
      const s = this.#bucket.get(id);
      if (s === undefined) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
      const next = structuredClone(s);
      change(next);
      next.updatedAt = new Date().toISOString();
      // The bucket changes `s` in place once JetStream has the record: its holders see it.
      await this.#bucket.put(id, next);
      updated = s;
    });
    return updated!;
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
