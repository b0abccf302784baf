// Bodies larger than the NATS server's max_payload (an activation tensor of a long sequence)
// go through a JetStream object store, which chunks them below max_payload: the message
// itself then carries only the object's name in a header. Each object has one deleter: a
// reply's is its receiver, which reads it and deletes it; a request's is its sender (`hold`),
// which stores it once for all the request's tries and deletes it when the request ends, so
// the header tells receivers to leave it. The bucket is in memory with a short TTL, so a body
// whose deleter died does not outlive it. It is opened only when a first body needs it: a
// cluster whose tensors fit in max_payload needs no JetStream for its messages. A gateway
// creates it at its start (prepare); workers may only open it.
import { Objm, StorageType } from '@nats-io/obj';
import type { ObjectStore } from '@nats-io/obj';
import { headers as natsHeaders, nanos, nuid } from '@nats-io/transport-node';
import type { Msg, MsgHdrs, NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { ClusterError } from './errors.ts';

/**
 * The max_payload infra/nats and `tandem cluster up` deploy (8MB, in bytes): a micro-batch's
 * activations below it travel inline. Above it they go through the object store, which hashes
 * and acknowledges every chunk: a 9 MiB body put and read back took ~250 ms on the 2-core
 * machine of the benches, ~27 ms per MB, where inline bodies cost ~5-10 ms per MB each way.
 */
export const RECOMMENDED_MAX_PAYLOAD = 8 * 1024 * 1024;

export const SPILL_BUCKET = 'tandem-wire';
export const SPILL_HEADER = 'tandem-body-object';
/** Set by a sender that deletes the object itself when its request ends: receivers only read it. */
export const SPILL_KEPT_HEADER = 'tandem-body-kept';
/** Room left in a message for its headers (trace, claim, spill) and the protocol's framing. */
const HEADROOM_BYTES = 2048;
/** A spilled body not read within this long is dropped by the server. */
const SPILL_TTL_MS = 10 * 60 * 1000;
const NAME_PATTERN = /^[A-Za-z0-9]{1,64}$/;
/** Reading a spilled body takes at most this long (the 40 MB of a long sequence read in ~1 s here). */
export const SPILL_READ_TIMEOUT_MS = 30_000;
/** What nats-server answers a write to a full store (server, account or stream limits). */
const STORE_FULL = /insufficient (storage |memory )?resources|maximum bytes exceeded|resource limits exceeded|storage limit/i;

/** A body stored once for all the tries of one request, until `release`. */
export interface HeldBody {
  /** The message's payload: the body itself, or nothing when the body is in the object store. */
  readonly data: Uint8Array;
  /** `headers` with the object's name, for one try. */
  label(headers: MsgHdrs): MsgHdrs;
  /** Deletes the object (once; a failure is left to the bucket's TTL). */
  release(): Promise<void>;
}

export interface SpillStats {
  /** Bodies written to the object store, and their bytes. */
  spilled: number;
  spilledBytes: number;
}

export class WireSpill {
  readonly #nc: NatsConnection;
  #store: Promise<ObjectStore> | undefined;
  readonly #stats: SpillStats = { spilled: 0, spilledBytes: 0 };

  readonly #readTimeoutMs: number;

  /** `readTimeoutMs`: how long reading one spilled body may take (SPILL_READ_TIMEOUT_MS). */
  constructor(nc: NatsConnection, options: { readTimeoutMs?: number } = {}) {
    this.#nc = nc;
    this.#readTimeoutMs = options.readTimeoutMs ?? SPILL_READ_TIMEOUT_MS;
  }

  get stats(): SpillStats {
    return { ...this.#stats };
  }

  /** The largest body sent inline: the server's max_payload less room for headers. */
  get inlineLimit(): number {
    const max = this.#nc.info?.max_payload ?? 1024 * 1024;
    return Math.max(0, max - HEADROOM_BYTES);
  }

  /** Whether a body of `bytes` goes through the object store (outgoing and hold decide by this). */
  spills(bytes: number): boolean {
    return bytes > this.inlineLimit;
  }

  /**
   * Creates the bucket now, when JetStream can (a gateway at its start): workers may not create
   * streams (infra/nats/auth.conf), only open this one. Whether it is there.
   */
  async prepare(): Promise<boolean> {
    return this.#open().then(() => true, () => false);
  }

  #open(): Promise<ObjectStore> {
    this.#store ??= new Objm(this.#nc).create(SPILL_BUCKET, { storage: StorageType.Memory, ttl: nanos(SPILL_TTL_MS), replicas: 1 }).catch((cause: unknown) => {
      this.#store = undefined;
      throw new ClusterError('TANDEM_CLUSTER_BODY_TOO_LARGE', { bytes: 0, limit: this.inlineLimit, reason: `the object store for large bodies is unavailable (is JetStream enabled?): ${(cause as Error).message}` }, { cause });
    });
    return this.#store;
  }

  /**
   * What to send for `body`: itself when it fits, else an empty payload and, in `headers`, the
   * name of the object that holds it, which its receiver deletes once read.
   */
  async outgoing(body: Uint8Array, headers: MsgHdrs = natsHeaders()): Promise<{ data: Uint8Array; headers: MsgHdrs }> {
    if (!this.spills(body.byteLength)) return { data: body, headers };
    headers.set(SPILL_HEADER, await this.#put(body));
    return { data: new Uint8Array(0), headers };
  }

  /**
   * `body` for a request that may be sent several times: inline when it fits, else stored once;
   * receivers read the object and leave it, and the caller releases it when the request ends.
   */
  async hold(body: Uint8Array): Promise<HeldBody> {
    if (!this.spills(body.byteLength)) return { data: body, label: (h) => h, release: async () => undefined };
    const name = await this.#put(body);
    let released: Promise<void> | undefined;
    return {
      data: new Uint8Array(0),
      label: (h) => {
        h.set(SPILL_HEADER, name);
        h.set(SPILL_KEPT_HEADER, '1');
        return h;
      },
      release: () => {
        released ??= this.#open().then((store) => store.delete(name)).then(() => undefined, () => undefined);
        return released;
      },
    };
  }

  /**
   * Stores `body` under a new name. A full store is TANDEM_STORE_FULL (503: the edge retries), or
   * TANDEM_RESOURCE_EXHAUSTED (400) when it holds no other body to wait for.
   */
  async #put(body: Uint8Array): Promise<string> {
    const name = nuid.next();
    const put = async (): Promise<void> => {
      await (await this.#open()).putBlob({ name, options: { max_chunk_size: Math.max(1024, this.inlineLimit) } }, body);
    };
    try {
      await put().catch(async (cause: unknown) => {
        if (STORE_FULL.test(String((cause as Error).message))) throw cause;
        // A restarted nats-server has lost the memory bucket: create it again, once.
        this.#store = undefined;
        await put();
      });
    } catch (cause) {
      const message = String((cause as Error).message);
      if (STORE_FULL.test(message)) {
        // Every body held here is over inlineLimit: a store holding less holds none (what is left
        // are deleted objects' markers), so this body will not fit however long the edge waits.
        const held = await this.#open().then((store) => store.status()).then((s) => s.size, () => undefined);
        if (held !== undefined && held < this.inlineLimit) {
          throw new CloudError('TANDEM_RESOURCE_EXHAUSTED', {
            resource: `space in the cluster's object store ${SPILL_BUCKET}`,
            reason: `a body of ${body.byteLength} bytes does not fit even with the store holding no other body (the NATS server's JetStream memory is smaller); send smaller micro-batches`,
          }, { cause });
        }
        throw new CloudError('TANDEM_STORE_FULL', { store: `cluster's object store ${SPILL_BUCKET} for bodies over max_payload`, reason: `the NATS server refused a body of ${body.byteLength} bytes (${message.slice(0, 80)})` }, { cause });
      }
      this.#store = undefined;
      throw new ClusterError('TANDEM_CLUSTER_BODY_TOO_LARGE', { bytes: body.byteLength, limit: this.inlineLimit, reason: `storing it in the object store failed: ${message}` }, { cause });
    }
    this.#stats.spilled++;
    this.#stats.spilledBytes += body.byteLength;
    return name;
  }

  /**
   * A received message's body: its payload, or the object its header names (read, then deleted
   * unless its sender keeps it), refused before it is read when the object is larger than
   * `maxBytes`. The object's record is its writer's word, and any holder of the worker password
   * may write one: a link (into another bucket, which reading would follow, or create) is
   * refused, and the chunks are read with a running count against the record's size and
   * `maxBytes`, so a record that says 16 bytes over 40 MB of chunks costs at most one chunk more.
   * The read has a deadline of its own (the request's covers only the message's arrival).
   */
  async incoming(msg: Msg, maxBytes: number): Promise<Uint8Array> {
    const h = msg.headers;
    if (h === undefined || !h.has(SPILL_HEADER)) return msg.data;
    const name = h.get(SPILL_HEADER);
    if (!NAME_PATTERN.test(name)) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: 'not an object name (1 to 64 letters and digits)' });
    const store = await this.#open();
    const invalid = (reason: string): ClusterError => new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason });
    try {
      const info = await store.info(name).catch((cause: unknown) => {
        this.#store = undefined;
        throw invalid(`the object store ${SPILL_BUCKET} cannot be read: ${(cause as Error).message}`);
      });
      if (info === null || info.deleted) throw invalid(`object ${name} is not in ${SPILL_BUCKET} (expired or already read)`);
      if (info.options?.link !== undefined && info.options.link !== null) throw invalid(`object ${name} is a link, not a body of its own`);
      if (!(Number.isSafeInteger(info.size) && info.size >= 0)) throw invalid(`object ${name} states a size of ${String(info.size)}`);
      if (info.size > maxBytes) throw new ClusterError('TANDEM_CLUSTER_BODY_TOO_LARGE', { bytes: info.size, limit: maxBytes, reason: 'the body is larger than this receiver accepts' });
      return await this.#read(store, name, info.size);
    } finally {
      if (!h.has(SPILL_KEPT_HEADER)) store.delete(name).catch(() => undefined);
    }
  }

  /** The `size` bytes of object `name`, read chunk by chunk: more, or not all of them within the read timeout, is refused. */
  async #read(store: ObjectStore, name: string, size: number): Promise<Uint8Array> {
    const got = await store.get(name);
    if (got === null) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: `object ${name} is not in ${SPILL_BUCKET} (expired or already read)` });
    // Cancelled early, the library's reader loop may still enqueue a chunk and then reject this.
    got.error.catch(() => undefined);
    const reader = got.data.getReader();
    const body = new Uint8Array(size);
    let filled = 0;
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: `object ${name} was not read whole within ${this.#readTimeoutMs} ms (${filled} of ${size} bytes)` })), this.#readTimeoutMs);
    });
    try {
      for (;;) {
        const { done, value } = await Promise.race([reader.read(), deadline]);
        if (done) break;
        if (filled + value.length > size) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: `object ${name} holds more than the ${size} bytes its record states` });
        body.set(value, filled);
        filled += value.length;
      }
      // The digest check ends the stream with an error: a corrupt object is refused too.
      await Promise.race([got.error, deadline]).catch((cause: unknown) => {
        throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: `object ${name} could not be read whole: ${(cause as Error).message}` });
      });
      if (filled !== size) throw new ClusterError('TANDEM_CLUSTER_MESSAGE_INVALID', { field: SPILL_HEADER, reason: `object ${name} holds ${filled} of the ${size} bytes its record states` });
      return body;
    } catch (error) {
      await reader.cancel().catch(() => undefined);
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }
}
