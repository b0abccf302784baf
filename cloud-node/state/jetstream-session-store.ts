// Session records in the JetStream bucket `tandem-sessions` (one entry per session, JSON),
// for the gateways of a cluster: a session welcomed by one gateway is known to every other,
// so an edge whose gateway died reattaches on another (SessionOpen). Writes are acknowledged
// by JetStream before the reply goes out, as the directory store fsyncs. A session being added
// counts as open from the moment add() is called, before JetStream has it, as the directory
// store counts it: concurrent Hellos of one tenant do not all pass its openSessions quota.
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
  readonly #adding: Adding;

  private constructor(bucket: JetStreamBucket<SessionRecord>, open: OpenSessionCounts, adding: Adding) {
    this.#bucket = bucket;
    this.#open = open;
    this.#adding = adding;
  }

  static async open(nc: NatsConnection, options: JetStreamStateOptions = {}): Promise<JetStreamSessionStore> {
    const open = new OpenSessionCounts();
    const adding = new Adding();
    const count = (tenant: string, delta: number): void => open.add(tenant, delta);
    // Snapshots of what was counted, since records are changed in place before a put.
    const counted = new Map<string, string>();
    const bucket = await JetStreamBucket.open<SessionRecord>(nc, SESSIONS_BUCKET, {
      replicas: options.replicas,
      markerGraceMs: options.markerGraceMs,
      parse: (value, key) => (isSessionRecord(value) && value.id === key ? value : undefined),
      onInvalid: options.onInvalid,
      onWatch: (state, reason) => options.onWatch?.(SESSIONS_BUCKET, state, reason),
      onChange: (key, _before, after) => {
        // The record landed (by the put or the watch, whichever came first): it counts as itself now.
        adding.release(key);
        const was = counted.get(key);
        if (was !== undefined) count(was, -1);
        counted.delete(key);
        if (after?.state === 'open') {
          count(after.tenant, 1);
          counted.set(key, after.tenant);
        }
      },
    });
    return new JetStreamSessionStore(bucket, open, adding);
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
    return this.#open.total + this.#adding.counts.total;
  }

  openCountOf(tenant: string): number {
    return this.#open.of(tenant) + this.#adding.counts.of(tenant);
  }

  get(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#bucket.get(id));
  }

  getOpen(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#bucket.get(id), true);
  }

  async add(record: SessionRecord): Promise<void> {
    // Counted before the first await; a put that fails takes it back.
    if (record.state === 'open') this.#adding.reserve(record.id, record.tenant);
    try {
      await this.#bucket.put(record.id, record);
    } finally {
      this.#adding.release(record.id);
    }
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

  /** Removes the delete markers of removed sessions due at `now`; the bucket does so by itself on a timer. */
  removeMarkers(now?: number): Promise<number> {
    return this.#bucket.removeMarkers(now);
  }

  close(): void {
    this.#bucket.close();
  }
}

/** Sessions being added, not yet in the bucket: counted open per tenant until they land or fail. */
class Adding {
  readonly counts = new OpenSessionCounts();
  readonly #tenants = new Map<string, string>();

  reserve(id: string, tenant: string): void {
    if (this.#tenants.has(id)) return;
    this.#tenants.set(id, tenant);
    this.counts.add(tenant, 1);
  }

  release(id: string): void {
    const tenant = this.#tenants.get(id);
    if (tenant === undefined) return;
    this.#tenants.delete(id);
    this.counts.add(tenant, -1);
  }
}
