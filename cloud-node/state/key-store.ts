// API keys, one or more per tenant (data owner), kept in <state>/keys.json. A key is
// `tdk_` + 32 random bytes (base64url); being high-entropy, it is stored as its plain
// sha256 (hex) — a slow salted hash buys nothing against guessing 256 bits.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CloudError } from '../errors.ts';
import { readJsonState, WriteQueue, writeJsonState } from './json-file.ts';

export const KEYS_FILE = 'keys.json';
export const ADMIN_TENANT = 'admin';
const TENANT_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface KeyRecord {
  id: string;
  tenant: string;
  admin: boolean;
  /** sha256 of the key, hex. */
  sha256: string;
  createdAt: string;
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

export function checkTenantName(tenant: string): void {
  if (!TENANT_PATTERN.test(tenant)) {
    throw new CloudError('TANDEM_TENANT_INVALID', { tenant: JSON.stringify(tenant), reason: `must match ${TENANT_PATTERN.source}` });
  }
}

function parseRecord(raw: unknown, file: string): KeyRecord {
  const r = raw as Partial<KeyRecord> | null;
  if (
    typeof r !== 'object' || r === null || typeof r.id !== 'string' || typeof r.tenant !== 'string' || typeof r.admin !== 'boolean'
    || typeof r.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(r.sha256) || typeof r.createdAt !== 'string'
  ) {
    throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `a key record is malformed: ${JSON.stringify(raw)}` });
  }
  return { id: r.id, tenant: r.tenant, admin: r.admin, sha256: r.sha256, createdAt: r.createdAt };
}

export class KeyStore {
  readonly path: string;
  #byHash = new Map<string, KeyRecord>();
  /** Identity of the file last read: inode, size and mtime (the CLI replaces it by rename). */
  #version = '';
  readonly #writes = new WriteQueue();

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
    return this.records.some((r) => r.admin);
  }

  /** Creates a key for `tenant`, persists its hash, and returns the key itself: the only time it is seen. */
  async create(tenant: string, options: { admin?: boolean } = {}): Promise<{ record: KeyRecord; key: string }> {
    checkTenantName(tenant);
    // Another process (`tandem keys create`) may have added keys since we read the file.
    await this.#reloadIfChanged();
    const key = `tdk_${randomBytes(32).toString('base64url')}`;
    const record: KeyRecord = { id: randomUUID(), tenant, admin: options.admin ?? false, sha256: hashKey(key), createdAt: new Date().toISOString() };
    this.#byHash.set(record.sha256, record);
    await this.#writes.run(async () => {
      await writeJsonState(this.path, { version: 1, keys: this.records });
      this.#version = await fileVersion(this.path);
    });
    return { record, key };
  }

  /** The caller a key belongs to; TANDEM_AUTH_KEY_MISSING or _INVALID otherwise. */
  async authenticate(key: unknown): Promise<Caller> {
    if (typeof key !== 'string' || key === '') throw new CloudError('TANDEM_AUTH_KEY_MISSING');
    const hash = hashKey(key);
    let record = this.#byHash.get(hash);
    if (record === undefined && (await this.#reloadIfChanged())) record = this.#byHash.get(hash);
    if (record === undefined) throw new CloudError('TANDEM_AUTH_KEY_INVALID');
    return { tenant: record.tenant, admin: record.admin, keyId: record.id };
  }

  async #reloadIfChanged(): Promise<boolean> {
    const version = await fileVersion(this.path);
    if (version === '' || version === this.#version) return false;
    await this.#load();
    return true;
  }

  async #load(): Promise<void> {
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
  }
}
