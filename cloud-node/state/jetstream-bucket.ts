// One JetStream key-value bucket of JSON records, mirrored in memory: read whole when opened,
// then kept current by a watch, so that every gateway of a cluster sees what any other wrote
// (a session opened on one gateway reattaches on another). Values are checked by `parse`
// before they are believed; a malformed one is skipped and reported. A deleted record's marker
// is removed from the stream once the other gateways' watches have seen it, so the stream holds
// the live records only, however many were ever written and deleted.
import { Bucket, Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';

export interface BucketOptions<T> {
  /** File storage (survives a nats-server restart), this many replicas in a JetStream cluster (1). */
  replicas?: number;
  parse: (value: unknown, key: string) => T | undefined;
  /** A record changed or appeared (`after`), or left (undefined), by any writer. */
  onChange?: (key: string, before: T | undefined, after: T | undefined) => void;
  onInvalid?: (key: string) => void;
  /** The watch that keeps the mirror current ended (`lost`: other gateways' writes are not seen) or was set up again (`restored`, after a reload). */
  onWatch?: (state: 'lost' | 'restored', reason?: string) => void;
  /** How long a delete marker stays in the stream before it is removed (MARKER_GRACE_MS); a watch later than that misses the delete. */
  markerGraceMs?: number;
  /** The server removes a record this long after its last put (ms; none by default). Set when the bucket is created. */
  ttlMs?: number;
}

/** What the JetStream stores of a gateway take: replicas, and where to report malformed entries and the watch. */
export interface JetStreamStateOptions {
  replicas?: number;
  onInvalid?: (key: string) => void;
  onWatch?: (bucket: string, state: 'lost' | 'restored', reason?: string) => void;
  /** See BucketOptions.markerGraceMs. */
  markerGraceMs?: number;
}

/** The first wait before a lost watch is set up again; it doubles up to WATCH_RETRY_MAX_MS. */
const WATCH_RETRY_MS = 250;
const WATCH_RETRY_MAX_MS = 5_000;

/** How many times a put is sent when JetStream does not answer it in time. */
const PUT_TRIES = 3;

/**
 * A delete marker is removed this long after it was written (rounds MARKER_ROUND_MS apart): the
 * other gateways' watches see the delete first. One missed (a watch set up again in between)
 * is made good by the reload that comes with it.
 */
const MARKER_GRACE_MS = 10_000;
const MARKER_ROUND_MS = 1_000;

/** A key a JetStream bucket accepts: ids are UUIDs and the like. */
const KEY_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;

export class JetStreamBucket<T> {
  readonly #kv: Bucket;
  readonly #options: BucketOptions<T>;
  readonly #values = new Map<string, T>();
  /**
   * The stream revision of each record as last applied here (a put's, the watch's, the load's):
   * one older arriving late — the watch's echo of this gateway's own earlier put — is not applied
   * over it. A key's entry goes with its delete marker.
   */
  readonly #revisions = new Map<string, number>();
  /** Keys whose delete marker is still in the stream, and when it was written (ms). */
  readonly #markers = new Map<string, number>();
  readonly #markerGraceMs: number;
  #markerTimer: NodeJS.Timeout | undefined;
  #stop: (() => void) | undefined;
  #closed = false;

  private constructor(kv: Bucket, options: BucketOptions<T>) {
    this.#kv = kv;
    this.#options = options;
    this.#markerGraceMs = options.markerGraceMs ?? MARKER_GRACE_MS;
  }

  static async open<T>(nc: NatsConnection, name: string, options: BucketOptions<T>): Promise<JetStreamBucket<T>> {
    const kv = await new Kvm(nc).create(name, { history: 1, replicas: options.replicas ?? 1, storage: 'file', ...(options.ttlMs === undefined ? {} : { ttl: options.ttlMs }) });
    // Removing a marker takes the stream's own API, which the bucket class has and the KV interface does not name.
    if (!(kv instanceof Bucket)) throw new Error(`the key-value bucket ${name} has no stream API`);
    const bucket = new JetStreamBucket<T>(kv, options);
    // A connection that closes (drained, or out of reconnects) ends the watch with it: its
    // heartbeat monitor would otherwise try to re-create the consumer on a closed connection.
    void nc.closed().then(() => bucket.close());
    await bucket.#watch();
    await bucket.#findMarkers();
    return bucket;
  }

  /**
   * Queues the markers already in the stream: left by a gateway that stopped before removing its
   * own, or by builds that kept them. Headers only, once per open, as the load reads the keys.
   */
  async #findMarkers(): Promise<void> {
    for await (const e of await this.#kv.history({ key: '>', headers_only: true })) {
      if (e.operation !== 'PUT') this.#markers.set(e.key, e.created.getTime());
    }
    this.#scheduleMarkers();
  }

  /**
   * The watch first, then the load (an update in between is applied twice, harmlessly). When
   * the watch ends while the bucket is open, it is reported and set up again with a reload,
   * so that a revoked key elsewhere does not stay valid here.
   */
  async #watch(): Promise<void> {
    const watch = await this.#kv.watch({ include: 'updates' });
    this.#stop = () => watch.stop();
    // Closed while the watch was being set up: nothing else would stop it.
    if (this.#closed) watch.stop();
    let abandoned = false;
    void (async () => {
      for await (const e of watch) this.#apply(e.key, e.revision, e.operation === 'PUT' ? e.value : undefined);
    })().then(() => 'the watch ended', (error: unknown) => (error as Error).message).then((reason) => { if (!abandoned) this.#rewatch(reason); });
    try {
      await this.#load();
    } catch (error) {
      // The caller sees the failure (an open that throws, or the next retry): this watch is not left behind.
      abandoned = true;
      watch.stop();
      throw error;
    }
  }

  #rewatch(reason: string): void {
    if (this.#closed) return;
    this.#options.onWatch?.('lost', reason);
    const retry = (delayMs: number): void => {
      const timer = setTimeout(() => {
        if (this.#closed) return;
        this.#watch().then(() => this.#options.onWatch?.('restored'), () => retry(Math.min(WATCH_RETRY_MAX_MS, delayMs * 2)));
      }, delayMs);
      timer.unref();
    };
    retry(WATCH_RETRY_MS);
  }

  /** Reads the whole bucket: every live entry applied, and a record gone from it forgotten. */
  async #load(): Promise<void> {
    const seen = new Set<string>();
    for await (const key of await this.#kv.keys()) {
      seen.add(key);
      const entry = await this.#kv.get(key);
      if (entry !== null && entry.operation === 'PUT') this.#apply(key, entry.revision, entry.value);
    }
    for (const key of [...this.#values.keys()]) {
      if (seen.has(key)) continue;
      this.#revisions.delete(key);
      this.#forget(key);
    }
  }

  /** An entry of the stream (the watch's, the load's); a marker (no bytes) is the key's last: nothing older follows it. */
  #apply(key: string, revision: number, bytes: Uint8Array | undefined): void {
    if (revision <= (this.#revisions.get(key) ?? 0)) return;
    if (bytes === undefined || bytes.byteLength === 0) {
      this.#revisions.delete(key);
      this.#forget(key);
      return;
    }
    this.#revisions.set(key, revision);
    let value: T | undefined;
    try {
      value = this.#options.parse(JSON.parse(Buffer.from(bytes).toString('utf8')), key);
    } catch {
      value = undefined;
    }
    if (value === undefined) {
      this.#options.onInvalid?.(key);
      return;
    }
    this.#set(key, value);
  }

  #forget(key: string): void {
    const before = this.#values.get(key);
    if (!this.#values.delete(key)) return;
    this.#options.onChange?.(key, before, undefined);
  }

  /** A record keeps its identity: holders of it see later changes, whoever made them. */
  #set(key: string, value: T): void {
    const existing = this.#values.get(key);
    if (existing === undefined || typeof existing !== 'object' || existing === null) {
      this.#values.set(key, value);
      this.#options.onChange?.(key, undefined, value);
      return;
    }
    const before = structuredClone(existing);
    const target = existing as Record<string, unknown>;
    for (const k of Object.keys(target)) if (!(k in (value as object))) delete target[k];
    Object.assign(target, value);
    this.#options.onChange?.(key, before, existing);
  }

  get(key: string): T | undefined {
    return this.#values.get(key);
  }

  values(): IterableIterator<T> {
    return this.#values.values();
  }

  get size(): number {
    return this.#values.size;
  }

  /**
   * Writes the record to JetStream (acknowledged by the server) and here. A put unanswered in
   * time (a nats-server restarting, JetStream recovering its streams) is sent again, up to
   * PUT_TRIES times: writing the whole record twice is the same as once.
   */
  async put(key: string, value: T): Promise<void> {
    if (!KEY_PATTERN.test(key)) throw new Error(`a bucket key must match ${KEY_PATTERN}, got ${JSON.stringify(key.slice(0, 40))}`);
    const data = JSON.stringify(value);
    let revision: number;
    for (let tries = 1; ; tries++) {
      try {
        revision = await this.#kv.put(key, data);
        break;
      } catch (error) {
        if (tries >= PUT_TRIES || !/timeout|no responders|jetstream not (enabled|available)|503/i.test(`${(error as Error).name} ${(error as Error).message}`)) throw error;
      }
    }
    // The watch may have applied this revision, or a later one of another writer, already.
    if (revision <= (this.#revisions.get(key) ?? 0)) return;
    this.#revisions.set(key, revision);
    this.#set(key, value);
  }

  /**
   * Removes the record; its delete marker (the watches' news of it) goes after markerGraceMs.
   * Not kv.purge (a rollup) nor kv.purgeDeletes (a purge by subject): nats-server 2.9.10
   * (Debian's; nats-server#3838 changed it later) moves every consumer whose filter covers the
   * purged subject past the messages it has not yet sent, so another gateway's watch would skip
   * other keys' puts (a revoked key among them). Deleting one message by its sequence moves no
   * consumer.
   */
  async delete(key: string): Promise<void> {
    await this.#kv.delete(key);
    // The revision stays until the watch brings the marker: an echo of an earlier put is not taken for the record.
    this.#forget(key);
    this.#markers.set(key, Date.now());
    this.#scheduleMarkers();
  }

  /**
   * Removes the markers written at least markerGraceMs before `now` (the bucket does this by
   * itself on a timer) and returns how many went: two requests per marker, none per live record.
   * A marker is deleted by its own sequence, so a value put again since is kept. One that fails
   * is tried again on the next round.
   */
  async removeMarkers(now = Date.now()): Promise<number> {
    const due = [...this.#markers].filter(([, at]) => now - at >= this.#markerGraceMs);
    for (const [key] of due) this.#markers.delete(key);
    let removed = 0;
    for (const [i, [key]] of due.entries()) {
      if (this.#closed) return removed;
      try {
        const entry = await this.#kv.get(key);
        if (entry !== null && entry.operation !== 'PUT' && (await this.#deleteMessage(entry.revision))) removed += 1;
        if (!this.#values.has(key)) this.#revisions.delete(key);
      } catch {
        // JetStream unanswered (a server restarting): this one and the rest wait for the next round.
        for (const [k, at] of due.slice(i)) if (!this.#markers.has(k)) this.#markers.set(k, at);
        break;
      }
    }
    return removed;
  }

  /** False when the message is gone already (the key was put again, or another gateway removed the marker). */
  async #deleteMessage(seq: number): Promise<boolean> {
    try {
      return await this.#kv.jsm.streams.deleteMessage(this.#kv.stream, seq, false);
    } catch (error) {
      if (/no message found/i.test((error as Error).message)) return false;
      throw error;
    }
  }

  /** A round when the oldest marker is due, at most one a MARKER_ROUND_MS: markers deleted together go together. */
  #scheduleMarkers(): void {
    if (this.#markerTimer !== undefined || this.#closed || this.#markers.size === 0) return;
    let oldest = Number.POSITIVE_INFINITY;
    for (const at of this.#markers.values()) oldest = Math.min(oldest, at);
    const delayMs = Math.max(Math.min(MARKER_ROUND_MS, this.#markerGraceMs), oldest + this.#markerGraceMs - Date.now());
    this.#markerTimer = setTimeout(() => {
      this.#markerTimer = undefined;
      void this.removeMarkers().then(() => this.#scheduleMarkers());
    }, delayMs);
    this.#markerTimer.unref();
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#markerTimer);
    this.#markerTimer = undefined;
    this.#stop?.();
  }
}
