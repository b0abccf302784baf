// One JetStream key-value bucket of JSON records, mirrored in memory: read whole when opened,
// then kept current by a watch, so that every gateway of a cluster sees what any other wrote
// (a session opened on one gateway reattaches on another). Values are checked by `parse`
// before they are believed; a malformed one is skipped and reported.
import { Kvm } from '@nats-io/kv';
import type { KV } from '@nats-io/kv';
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
}

/** What the JetStream stores of a gateway take: replicas, and where to report malformed entries and the watch. */
export interface JetStreamStateOptions {
  replicas?: number;
  onInvalid?: (key: string) => void;
  onWatch?: (bucket: string, state: 'lost' | 'restored', reason?: string) => void;
}

/** The first wait before a lost watch is set up again; it doubles up to WATCH_RETRY_MAX_MS. */
const WATCH_RETRY_MS = 250;
const WATCH_RETRY_MAX_MS = 5_000;

/** How many times a put is sent when JetStream does not answer it in time. */
const PUT_TRIES = 3;

/** A key a JetStream bucket accepts: ids are UUIDs and the like. */
const KEY_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;

export class JetStreamBucket<T> {
  readonly #kv: KV;
  readonly #options: BucketOptions<T>;
  readonly #values = new Map<string, T>();
  #stop: (() => void) | undefined;
  #closed = false;

  private constructor(kv: KV, options: BucketOptions<T>) {
    this.#kv = kv;
    this.#options = options;
  }

  static async open<T>(nc: NatsConnection, name: string, options: BucketOptions<T>): Promise<JetStreamBucket<T>> {
    const kv = await new Kvm(nc).create(name, { history: 1, replicas: options.replicas ?? 1, storage: 'file' });
    const bucket = new JetStreamBucket<T>(kv, options);
    // A connection that closes (drained, or out of reconnects) ends the watch with it: its
    // heartbeat monitor would otherwise try to re-create the consumer on a closed connection.
    void nc.closed().then(() => bucket.close());
    await bucket.#watch();
    return bucket;
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
      for await (const e of watch) this.#apply(e.key, e.operation === 'PUT' ? e.value : undefined);
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
      if (entry !== null && entry.operation === 'PUT') this.#apply(key, entry.value);
    }
    for (const key of [...this.#values.keys()]) if (!seen.has(key)) this.#apply(key, undefined);
  }

  #apply(key: string, bytes: Uint8Array | undefined): void {
    if (bytes === undefined || bytes.byteLength === 0) {
      const before = this.#values.get(key);
      if (!this.#values.delete(key)) return;
      this.#options.onChange?.(key, before, undefined);
      return;
    }
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
    for (let tries = 1; ; tries++) {
      try {
        await this.#kv.put(key, data);
        break;
      } catch (error) {
        if (tries >= PUT_TRIES || !/timeout|no responders|jetstream not (enabled|available)|503/i.test(`${(error as Error).name} ${(error as Error).message}`)) throw error;
      }
    }
    this.#set(key, value);
  }

  async delete(key: string): Promise<void> {
    await this.#kv.delete(key);
    this.#apply(key, undefined);
  }

  close(): void {
    this.#closed = true;
    this.#stop?.();
  }
}
