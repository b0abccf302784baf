// Held middle adapters' checkpoints for a cluster's gateways (held-adapter-store.ts is the one
// process's): any gateway may serve a session's next request, so the checkpoint is the truth
// and a gateway's copy is a cache of it.
//
// - The object store `tandem-held` holds the tensors: per session one checkpoint object (the
//   whole adapter, as held-adapter-store.ts writes its JSON) and one object per backward's
//   gradients of the step in progress, each under a name used once.
// - The key-value bucket `tandem-held-heads` holds per session its head: the names of the
//   objects that make the checkpoint now, the tenant and the adapter's bytes. A write puts its
//   new object first, then moves the head with a compare-and-set on the revision this gateway
//   last read or wrote, then deletes what the head no longer names. A gateway whose copy is
//   behind (another gateway wrote since) finds the head moved: its write is refused
//   (TANDEM_HELD_ADAPTER_MOVED) and its new object deleted, so no write lands on a checkpoint it
//   did not start from. A reader compares the head's revision with its own before each use.
// - A deleted object's marker and a removed head are deleted from their streams by sequence:
//   the buckets hold the live checkpoints only, however many steps were written.
import { createHash } from 'node:crypto';
import { Bucket, Kvm } from '@nats-io/kv';
import type { KvEntry } from '@nats-io/kv';
import { Objm, StorageType } from '@nats-io/obj';
import type { ObjectStore } from '@nats-io/obj';
import { nuid } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { gradientBytes, heldBytes, parseSnapshot, snapshotRecord, splitGradients } from './held-adapter-store.ts';
import type { HeldAdapterSnapshot, HeldCheckpoints } from './held-adapter-store.ts';

export const HELD_OBJECTS_BUCKET = 'tandem-held';
export const HELD_HEADS_BUCKET = 'tandem-held-heads';

/** The largest checkpoint object read back (a tenant's heldAdapterBytes is 256 MiB by default; base64 and AdamW's buffers included). */
const MAX_CHECKPOINT_BYTES = 1024 * 1024 * 1024;
const SESSION_ID = /^[0-9a-f-]{1,64}$/;

/** What makes a session's checkpoint now. */
interface Head {
  tenant: string;
  /** The adapter's bytes (weights and AdamW's buffers): the tenant's heldAdapterBytes across the cluster. */
  bytes: number;
  checkpoint: string;
  /** Gradients of the step in progress written since the checkpoint, by micro-batch. */
  gradients: { step: number; files: [number, string][] } | null;
}

function isHead(v: unknown): v is Head {
  if (typeof v !== 'object' || v === null) return false;
  const h = v as Record<string, unknown>;
  const g = h.gradients as Record<string, unknown> | null;
  return typeof h.tenant === 'string' && Number.isSafeInteger(h.bytes) && typeof h.checkpoint === 'string'
    && (g === null || (typeof g === 'object' && Number.isSafeInteger(g.step) && Array.isArray(g.files)
      && (g.files as unknown[]).every((f) => Array.isArray(f) && f.length === 2 && Number.isSafeInteger(f[0]) && typeof f[1] === 'string')));
}

/** A tenant's token in head keys: heads of one tenant are listed by prefix. */
const tenantToken = (tenant: string): string => createHash('sha256').update(tenant).digest('hex').slice(0, 32);

function keyOf(sessionId: string, tenant: string): string {
  if (!SESSION_ID.test(sessionId)) throw new CloudError('TANDEM_INTERNAL', { reason: 'a held adapter\'s session id is not a UUID' });
  return `${tenantToken(tenant)}.${sessionId}`;
}

const encode = (v: unknown): Uint8Array => new TextEncoder().encode(JSON.stringify(v));

/** A head as stored, when it is one. */
function headOf(entry: KvEntry): Head | undefined {
  try {
    const v: unknown = entry.json();
    return isHead(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

/** JetStream did not answer a read or write of the checkpoint (a nats-server restarting): retryable. */
function unavailable(sessionId: string, cause: unknown): CloudError {
  return new CloudError('TANDEM_HELD_CHECKPOINT_UNAVAILABLE', { session: sessionId, reason: String((cause as Error)?.message ?? cause).slice(0, 200) }, { cause });
}

function moved(sessionId: string, cause: unknown): CloudError {
  return new CloudError('TANDEM_HELD_ADAPTER_MOVED', { session: sessionId, reason: `its checkpoint was written elsewhere since this gateway read it (${(cause as Error).message})`.slice(0, 300) }, { cause });
}

/** A compare-and-set that lost (the head moved or exists): not a connection failure. */
const isConflict = (error: unknown): boolean => /wrong last sequence|key exists/i.test(String((error as Error)?.message));

export class JetStreamHeldAdapterStore implements HeldCheckpoints {
  readonly #heads: Bucket;
  readonly #objects: ObjectStore;
  /** Per session, the head this gateway last read or wrote and its revision. */
  readonly #known = new Map<string, { head: Head; revision: number }>();

  private constructor(heads: Bucket, objects: ObjectStore) {
    this.#heads = heads;
    this.#objects = objects;
  }

  /** File storage (survives a nats-server restart), `replicas` copies in a JetStream cluster (1). */
  static async open(nc: NatsConnection, options: { replicas?: number } = {}): Promise<JetStreamHeldAdapterStore> {
    const heads = await new Kvm(nc).create(HELD_HEADS_BUCKET, { history: 1, replicas: options.replicas ?? 1, storage: 'file' });
    if (!(heads instanceof Bucket)) throw new Error(`the key-value bucket ${HELD_HEADS_BUCKET} has no stream API`);
    const objects = await new Objm(nc).create(HELD_OBJECTS_BUCKET, { storage: StorageType.File, replicas: options.replicas ?? 1 });
    return new JetStreamHeldAdapterStore(heads, objects);
  }

  /** A gateway reads each session's checkpoint when the session first needs it. */
  async loadAll(): Promise<HeldAdapterSnapshot[]> {
    return [];
  }

  async save(s: HeldAdapterSnapshot): Promise<void> {
    const name = `${s.sessionId}.${nuid.next()}.json`;
    await this.#put(s.sessionId, name, encode(snapshotRecord(s)));
    const before = await this.#move(s.sessionId, s.tenant, { tenant: s.tenant, bytes: heldBytes(s.params), checkpoint: name, gradients: null }, name);
    if (before !== undefined) await this.#deleteObjects([before.checkpoint, ...(before.gradients?.files ?? []).map(([, f]) => f)]);
  }

  async saveGradients(sessionId: string, step: number, microbatch: number, grads: readonly Float32Array[]): Promise<void> {
    const known = this.#known.get(sessionId);
    if (known === undefined) throw moved(sessionId, new Error('this gateway holds no revision of it'));
    const name = `${sessionId}.${nuid.next()}.step-${step}.mb-${microbatch}.f32`;
    await this.#put(sessionId, name, gradientBytes(grads));
    const previous = known.head.gradients?.step === step ? known.head.gradients.files : [];
    const replaced = previous.filter(([mb]) => mb === microbatch).map(([, f]) => f);
    const files: [number, string][] = [...previous.filter(([mb]) => mb !== microbatch), [microbatch, name]];
    // A later step's first backward starts the list anew: the earlier step's were applied or abandoned.
    const dropped = known.head.gradients?.step === step ? replaced : (known.head.gradients?.files ?? []).map(([, f]) => f);
    await this.#move(sessionId, known.head.tenant, { ...known.head, gradients: { step, files } }, name);
    await this.#deleteObjects(dropped);
  }

  /**
   * Moves the session's head to `head` from the revision known here (creates it when none is);
   * returns the head it replaced. A lost compare-and-set deletes `written` and is
   * TANDEM_HELD_ADAPTER_MOVED; any other failure (no answer from JetStream) reads the head again,
   * since the move may have landed: the write stands if the head names `written`.
   */
  async #move(sessionId: string, tenant: string, head: Head, written: string): Promise<Head | undefined> {
    const key = keyOf(sessionId, tenant);
    const known = this.#known.get(sessionId);
    let revision: number;
    try {
      revision = known === undefined ? await this.#heads.create(key, encode(head)) : await this.#heads.update(key, encode(head), known.revision);
    } catch (error) {
      this.#known.delete(sessionId);
      if (isConflict(error)) {
        await this.#deleteObjects([written]);
        throw moved(sessionId, error);
      }
      const landed = await this.#heads.get(key).then((e) => (e?.operation === 'PUT' ? { entry: e, head: headOf(e) } : undefined), () => undefined);
      if (landed?.head?.checkpoint === written || landed?.head?.gradients?.files.some(([, f]) => f === written)) {
        this.#known.set(sessionId, { head: landed.head, revision: landed.entry.revision });
        return known?.head;
      }
      if (landed !== undefined) await this.#deleteObjects([written]);
      throw unavailable(sessionId, error);
    }
    this.#known.set(sessionId, { head, revision });
    return known?.head;
  }

  async latest(sessionId: string, tenant: string): Promise<HeldAdapterSnapshot | 'gone' | 'same'> {
    const key = keyOf(sessionId, tenant);
    for (let tries = 0; ; tries++) {
      const entry = await this.#heads.get(key).catch((error: unknown) => {
        throw unavailable(sessionId, error);
      });
      if (entry === null || entry.operation !== 'PUT') {
        this.#known.delete(sessionId);
        return 'gone';
      }
      if (this.#known.get(sessionId)?.revision === entry.revision) return 'same';
      const file = `${HELD_HEADS_BUCKET}/${entry.key}`;
      const head = headOf(entry);
      if (head === undefined || head.tenant !== tenant) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'not a held adapter\'s head' });
      const snapshot = await this.#read(head, sessionId, file);
      if (snapshot !== undefined) {
        this.#known.set(sessionId, { head, revision: entry.revision });
        return snapshot;
      }
      // An object the head named is gone: a write replaced it meanwhile (read the new head), or,
      // the head unchanged, the checkpoint is broken.
      const now = await this.#heads.get(key).catch(() => null);
      if (now?.revision === entry.revision || tries >= 3) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'it names an object the store does not hold' });
    }
  }

  /** The checkpoint object, and the gradients written since, as one snapshot; undefined when an object it names is gone. */
  async #read(head: Head, sessionId: string, file: string): Promise<HeldAdapterSnapshot | undefined> {
    const blob = async (name: string): Promise<Uint8Array | undefined> => {
      const info = await this.#objects.info(name).catch((error: unknown) => {
        throw unavailable(sessionId, error);
      });
      if (info === null || info.deleted) return undefined;
      if (info.size > MAX_CHECKPOINT_BYTES) throw new CloudError('TANDEM_STATE_INVALID', { file: `${HELD_OBJECTS_BUCKET}/${name}`, reason: `${info.size} bytes; the limit is ${MAX_CHECKPOINT_BYTES}` });
      const data = await this.#objects.getBlob(name).catch((error: unknown) => {
        throw unavailable(sessionId, error);
      });
      return data ?? undefined;
    };
    const checkpoint = await blob(head.checkpoint);
    if (checkpoint === undefined) return undefined;
    let raw: unknown;
    try {
      raw = JSON.parse(new TextDecoder().decode(checkpoint));
    } catch {
      throw new CloudError('TANDEM_STATE_INVALID', { file: `${HELD_OBJECTS_BUCKET}/${head.checkpoint}`, reason: 'not JSON' });
    }
    if (typeof raw !== 'object' || raw === null) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'the checkpoint is not a map' });
    const snapshot = parseSnapshot(raw as Record<string, unknown>, `${HELD_OBJECTS_BUCKET}/${head.checkpoint}`);
    if (snapshot.sessionId !== sessionId) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'the checkpoint is another session\'s' });
    const g = head.gradients;
    // Steps count from 0: before the first commit, any step's gradients are the step in progress.
    if (g !== null && g.step > (snapshot.last?.step ?? -1)) {
      const lengths = snapshot.params.map((p) => p.value.length);
      const microbatches = new Map(snapshot.pending?.step === g.step ? snapshot.pending.microbatches : []);
      for (const [mb, name] of g.files) {
        const bytes = await blob(name);
        if (bytes === undefined) return undefined;
        microbatches.set(mb, splitGradients(bytes, lengths, `${HELD_OBJECTS_BUCKET}/${name}`));
      }
      snapshot.pending = { step: g.step, microbatches: [...microbatches].sort((a, b) => a[0] - b[0]) };
    }
    return snapshot;
  }

  forget(sessionId: string): void {
    this.#known.delete(sessionId);
  }

  /**
   * Removes the session's head, then every object of the session (by name: those a gateway
   * killed midway left unnamed too). The head is deleted by its sequence, not marked (a marker
   * per session would stay) nor purged by subject (on nats-server 2.9 that moves every watch of
   * the stream past what it was not yet sent); a write landing in between moves it, and it is
   * read again.
   */
  async remove(sessionId: string, tenant: string): Promise<void> {
    const key = keyOf(sessionId, tenant);
    this.#known.delete(sessionId);
    for (let tries = 0; ; tries++) {
      const entry = await this.#heads.get(key);
      if (entry === null) break;
      try {
        await this.#heads.jsm.streams.deleteMessage(this.#heads.stream, entry.revision, false);
        break;
      } catch (error) {
        // No such message (JetStream's 10057 or 10037: a newer put replaced it): read the head again.
        const code = (error as { code?: unknown }).code;
        if (tries >= 5 || !(code === 10057 || code === 10037 || /not found/i.test(String((error as Error).message)))) throw error;
      }
    }
    const names = (await this.#objects.list()).filter((o) => !o.deleted && o.name.startsWith(`${sessionId}.`)).map((o) => o.name);
    await this.#deleteObjects(names);
  }

  /** The bytes of the tenant's held adapters on every gateway: the sum over its heads. */
  async bytesOf(tenant: string): Promise<number> {
    let n = 0;
    for await (const key of await this.#heads.keys(`${tenantToken(tenant)}.*`)) {
      const entry = await this.#heads.get(key);
      const head = entry?.operation === 'PUT' ? headOf(entry) : undefined;
      if (head !== undefined && head.tenant === tenant) n += head.bytes;
    }
    return n;
  }

  async #put(sessionId: string, name: string, data: Uint8Array): Promise<void> {
    try {
      await this.#objects.putBlob({ name }, data);
    } catch (error) {
      await this.#deleteObjects([name]);
      throw unavailable(sessionId, error);
    }
  }

  /** Deletes objects and purges their markers (best effort: one left is found by nothing and costs a marker). */
  async #deleteObjects(names: readonly string[]): Promise<void> {
    for (const name of names) {
      try {
        await this.#objects.delete(name);
        // The object store's delete leaves a marker under the name's meta subject: removed by its sequence.
        const meta = `$O.${HELD_OBJECTS_BUCKET}.M.${Buffer.from(name).toString('base64').replace(/\+/g, '-').replace(/\//g, '_')}`;
        const marker = await this.#heads.jsm.streams.getMessage(`OBJ_${HELD_OBJECTS_BUCKET}`, { last_by_subj: meta });
        if (marker !== null) await this.#heads.jsm.streams.deleteMessage(`OBJ_${HELD_OBJECTS_BUCKET}`, marker.seq, false);
      } catch {
        // gone already, or the server is unreachable: the next write's delete does not need it
      }
    }
  }
}
