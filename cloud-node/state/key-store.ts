// API keys, one or more per tenant (data owner), kept in <state>/keys.json. A key is
// `tdk_` + 32 random bytes (base64url); being high-entropy, it is stored as its plain
// sha256 (hex) — a slow salted hash buys nothing against guessing 256 bits. Listings show
// a key's first characters only (`prefix`). A revoked key stays in the file, marked, so that
// its holder is told it was revoked; every lookup first checks whether the file changed
// (another process, `tandem keys revoke`, may have rewritten it).
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CloudError } from '../errors.ts';
import { readJsonState, WriteQueue, writeJsonState } from './json-file.ts';

export const KEYS_FILE = 'keys.json';
export const ADMIN_TENANT = 'admin';
const TENANT_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** Names no data owner may take (compared case-insensitively): they would read as the operator's. */
export const RESERVED_TENANTS: readonly string[] = [ADMIN_TENANT, 'administrator', 'root', 'system', 'operator', 'tandem', 'node', 'cloud', 'anonymous', 'metrics'];
/** Characters of a key shown in listings: `tdk_` and 8 of the 43 random ones (48 bits; the key stays secret). */
export const KEY_PREFIX_LENGTH = 12;

export interface KeyRecord {
  id: string;
  tenant: string;
  admin: boolean;
  /** sha256 of the key, hex. */
  sha256: string;
  /** The key's first KEY_PREFIX_LENGTH characters, for listings (absent for keys of earlier builds). */
  prefix?: string;
  createdAt: string;
  revokedAt?: string;
}

/** A key as listings show it: never the key, never its hash. */
export interface KeyView {
  id: string;
  tenant: string;
  admin: boolean;
  prefix: string;
  createdAt: string;
  revokedAt?: string;
}

/** Who a request comes from, once its key checked out. */
export interface Caller {
  tenant: string;
  admin: boolean;
  keyId: string;
}

async function fileVersion(path: string): Promise<string> {
  try {
    const s = await stat(path);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  } catch {
    return '';
  }
}

export function hashKey(key: string): string {
  return createHash('sha256').update(key, 'utf8').digest('hex');
}

export function checkTenantName(tenant: string, options: { admin?: boolean } = {}): void {
  if (!TENANT_PATTERN.test(tenant)) {
    throw new CloudError('TANDEM_TENANT_INVALID', { tenant: JSON.stringify(tenant), reason: `must match ${TENANT_PATTERN.source}` });
  }
  if (!options.admin && RESERVED_TENANTS.includes(tenant.toLowerCase())) {
    throw new CloudError('TANDEM_TENANT_INVALID', { tenant: JSON.stringify(tenant), reason: `reserved names (${RESERVED_TENANTS.join(', ')}) are not given to tenants` });
  }
}

export function viewOf(r: KeyRecord): KeyView {
  return { id: r.id, tenant: r.tenant, admin: r.admin, prefix: r.prefix ?? '', createdAt: r.createdAt, ...(r.revokedAt === undefined ? {} : { revokedAt: r.revokedAt }) };
}

/** A key record as stored (keys.json, a JetStream entry), checked. */
export function parseRecord(raw: unknown, file: string): KeyRecord {
  const r = raw as Partial<KeyRecord> | null;
  if (
    typeof r !== 'object' || r === null || typeof r.id !== 'string' || typeof r.tenant !== 'string' || typeof r.admin !== 'boolean'
    || typeof r.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(r.sha256) || typeof r.createdAt !== 'string'
  ) {
    throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `a key record is malformed: ${JSON.stringify(raw)}` });
  }
  if ((r.prefix !== undefined && typeof r.prefix !== 'string') || (r.revokedAt !== undefined && typeof r.revokedAt !== 'string')) {
    throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `a key record is malformed: ${JSON.stringify(raw)}` });
  }
  return {
    id: r.id, tenant: r.tenant, admin: r.admin, sha256: r.sha256, createdAt: r.createdAt,
    ...(r.prefix === undefined ? {} : { prefix: r.prefix }), ...(r.revokedAt === undefined ? {} : { revokedAt: r.revokedAt }),
  };
}

export class KeyStore {
  readonly path: string;
  #byHash = new Map<string, KeyRecord>();
  /** Identity of the file last read: inode, size and mtime (the CLI replaces it by rename). */
  #version = '';
  readonly #writes = new WriteQueue();
  readonly #revokeListeners: ((record: KeyRecord) => void)[] = [];

  private constructor(path: string) {
    this.path = path;
  }

  static async open(stateDir: string): Promise<KeyStore> {
    const store = new KeyStore(join(stateDir, KEYS_FILE));
    await store.#load();
    return store;
  }

  get records(): KeyRecord[] {
    return [...this.#byHash.values()];
  }

  get hasAdmin(): boolean {
    return this.records.some((r) => r.admin && r.revokedAt === undefined);
  }

  /** Every key as listings show it (prefix only), the file re-read if another process changed it. */
  async list(): Promise<KeyView[]> {
    await this.reloadIfChanged();
    return this.records.map(viewOf);
  }

  /** `listener` is called once for every key revoked from now on, by this process or another. */
  onRevoked(listener: (record: KeyRecord) => void): void {
    this.#revokeListeners.push(listener);
  }

  /** Creates a key for `tenant`, persists its hash, and returns the key itself: the only time it is seen. */
  async create(tenant: string, options: { admin?: boolean } = {}): Promise<{ record: KeyRecord; key: string }> {
    checkTenantName(tenant, options);
    // Another process (`tandem keys create`) may have added keys since we read the file.
    await this.reloadIfChanged();
    const key = `tdk_${randomBytes(32).toString('base64url')}`;
    const record: KeyRecord = { id: randomUUID(), tenant, admin: options.admin ?? false, sha256: hashKey(key), prefix: key.slice(0, KEY_PREFIX_LENGTH), createdAt: new Date().toISOString() };
    this.#byHash.set(record.sha256, record);
    await this.#save();
    return { record, key };
  }

  /**
   * Revokes the key with this id (or, when unambiguous, this prefix): it fails from the next
   * request on, and open sockets authenticated with it are told and disconnected. Revoking
   * twice is a no-op. TANDEM_KEY_UNKNOWN when no key matches.
   */
  async revoke(idOrPrefix: string): Promise<KeyView> {
    await this.reloadIfChanged();
    const matches = this.records.filter((r) => r.id === idOrPrefix || (idOrPrefix.length >= 8 && r.prefix !== undefined && r.prefix.startsWith(idOrPrefix)));
    if (matches.length !== 1) throw new CloudError('TANDEM_KEY_UNKNOWN', { keyId: JSON.stringify(idOrPrefix) });
    const record = matches[0];
    if (record.revokedAt === undefined) {
      record.revokedAt = new Date().toISOString();
      await this.#save();
      this.#emitRevoked(record);
    }
    return viewOf(record);
  }

  /** The caller a key belongs to; TANDEM_AUTH_KEY_MISSING, _INVALID or _REVOKED otherwise. */
  async authenticate(key: unknown): Promise<Caller> {
    if (typeof key !== 'string' || key === '') throw new CloudError('TANDEM_AUTH_KEY_MISSING');
    // No cached answer outlives a change of the file: a key revoked by another process fails now.
    await this.reloadIfChanged();
    const record = this.#byHash.get(hashKey(key));
    if (record === undefined) throw new CloudError('TANDEM_AUTH_KEY_INVALID');
    if (record.revokedAt !== undefined) throw new CloudError('TANDEM_AUTH_KEY_REVOKED', { keyId: record.id, revokedAt: record.revokedAt });
    return { tenant: record.tenant, admin: record.admin, keyId: record.id };
  }

  /** Re-reads the file when another process replaced it; true when it did. */
  async reloadIfChanged(): Promise<boolean> {
    const version = await fileVersion(this.path);
    if (version === '' || version === this.#version) return false;
    await this.#load();
    return true;
  }

  async #save(): Promise<void> {
    await this.#writes.run(async () => {
      await writeJsonState(this.path, { version: 1, keys: this.records });
      this.#version = await fileVersion(this.path);
    });
  }

  #emitRevoked(record: KeyRecord): void {
    for (const listener of this.#revokeListeners) listener(record);
  }

  async #load(): Promise<void> {
    const revokedBefore = new Set(this.records.filter((r) => r.revokedAt !== undefined).map((r) => r.id));
    const known = this.#byHash.size > 0;
    const raw = await readJsonState(this.path);
    const byHash = new Map<string, KeyRecord>();
    if (raw !== undefined) {
      if (!Array.isArray(raw.keys)) throw new CloudError('TANDEM_STATE_INVALID', { file: this.path, reason: 'keys must be an array' });
      for (const item of raw.keys) {
        const record = parseRecord(item, this.path);
        byHash.set(record.sha256, record);
      }
      this.#version = await fileVersion(this.path);
    }
    this.#byHash = byHash;
    if (known) for (const r of byHash.values()) if (r.revokedAt !== undefined && !revokedBefore.has(r.id)) this.#emitRevoked(r);
  }
}
