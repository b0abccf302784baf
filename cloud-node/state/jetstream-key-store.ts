// API keys in the JetStream bucket `tandem-keys`, one entry per key: its id, tenant and sha256
// (hex), as keys.json stores them; never a key itself. Every gateway of a cluster holds the
// bucket in memory through a watch, so a key created or revoked on one gateway holds on every
// other at once (revoked sockets are told and disconnected there too).
import { randomBytes, randomUUID } from 'node:crypto';
import type { NatsConnection } from '@nats-io/transport-node';
import { CloudError } from '../errors.ts';
import { JetStreamBucket } from './jetstream-bucket.ts';
import type { JetStreamStateOptions } from './jetstream-bucket.ts';
import type { KeyRecords } from './key-records.ts';
import { KEY_PREFIX_LENGTH, checkTenantName, hashKey, parseRecord, viewOf } from './key-store.ts';
import type { Caller, KeyRecord, KeyView } from './key-store.ts';

export const KEYS_BUCKET = 'tandem-keys';

export class JetStreamKeyStore implements KeyRecords {
  readonly #bucket: JetStreamBucket<KeyRecord>;
  readonly #listeners: ((record: KeyRecord) => void)[];

  private constructor(bucket: JetStreamBucket<KeyRecord>, listeners: ((record: KeyRecord) => void)[]) {
    this.#bucket = bucket;
    this.#listeners = listeners;
  }

  static async open(nc: NatsConnection, options: JetStreamStateOptions = {}): Promise<JetStreamKeyStore> {
    const listeners: ((record: KeyRecord) => void)[] = [];
    const bucket = await JetStreamBucket.open<KeyRecord>(nc, KEYS_BUCKET, {
      replicas: options.replicas,
      markerGraceMs: options.markerGraceMs,
      parse: (value, key) => {
        try {
          const r = parseRecord(value, `${KEYS_BUCKET}/${key}`);
          return r.id === key ? r : undefined;
        } catch {
          return undefined;
        }
      },
      onInvalid: options.onInvalid,
      onWatch: (state, reason) => options.onWatch?.(KEYS_BUCKET, state, reason),
      onChange: (_key, before, after) => {
        if (after?.revokedAt !== undefined && before?.revokedAt === undefined && before !== undefined) for (const l of listeners) l(after);
      },
    });
    return new JetStreamKeyStore(bucket, listeners);
  }

  get records(): KeyRecord[] {
    return [...this.#bucket.values()];
  }

  get hasAdmin(): boolean {
    return this.records.some((r) => r.admin && r.revokedAt === undefined);
  }

  async list(): Promise<KeyView[]> {
    return this.records.map(viewOf);
  }

  onRevoked(listener: (record: KeyRecord) => void): void {
    this.#listeners.push(listener);
  }

  async create(tenant: string, options: { admin?: boolean } = {}): Promise<{ record: KeyRecord; key: string }> {
    checkTenantName(tenant, options);
    const key = `tdk_${randomBytes(32).toString('base64url')}`;
    const record: KeyRecord = { id: randomUUID(), tenant, admin: options.admin ?? false, sha256: hashKey(key), prefix: key.slice(0, KEY_PREFIX_LENGTH), createdAt: new Date().toISOString() };
    await this.#bucket.put(record.id, record);
    return { record, key };
  }

  async revoke(idOrPrefix: string): Promise<KeyView> {
    const matches = this.records.filter((r) => r.id === idOrPrefix || (idOrPrefix.length >= 8 && r.prefix !== undefined && r.prefix.startsWith(idOrPrefix)));
    if (matches.length !== 1) throw new CloudError('TANDEM_KEY_UNKNOWN', { keyId: JSON.stringify(idOrPrefix) });
    const record = matches[0];
    if (record.revokedAt === undefined) await this.#bucket.put(record.id, { ...record, revokedAt: new Date().toISOString() });
    return viewOf(this.#bucket.get(record.id) ?? record);
  }

  async authenticate(key: unknown): Promise<Caller> {
    if (typeof key !== 'string' || key === '') throw new CloudError('TANDEM_AUTH_KEY_MISSING');
    const sha256 = hashKey(key);
    const record = this.records.find((r) => r.sha256 === sha256);
    if (record === undefined) throw new CloudError('TANDEM_AUTH_KEY_INVALID');
    if (record.revokedAt !== undefined) throw new CloudError('TANDEM_AUTH_KEY_REVOKED', { keyId: record.id, revokedAt: record.revokedAt });
    return { tenant: record.tenant, admin: record.admin, keyId: record.id };
  }

  /** The watch keeps the bucket current: nothing to re-read. */
  async reloadIfChanged(): Promise<boolean> {
    return false;
  }

  close(): void {
    this.#bucket.close();
  }
}
