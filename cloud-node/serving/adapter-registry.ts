// The adapters tenants upload for serving, kept as PEFT folders under the state directory:
//   <stateDir>/serving/adapters/<tenant>/<name>/{adapter_config.json, adapter_model.safetensors, record.json}
// An adapter is private to its tenant unless uploaded with `shared`; another tenant's private
// adapter does not exist for the caller (404, the same answer as a name nobody uses).
import { createHash } from 'node:crypto';
import { mkdir, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MAX_ADAPTER_TENSORS, checkServableHooks, loadAdapter, parseSafetensors } from '../../model/index.ts';
import { adapterErrorOf, checkAdapterCost, MAX_ADAPTER_ALLOCATION_BYTES } from '../adapter-evaluation.ts';
import { CloudError } from '../errors.ts';
import { checkServedAdapters } from '../quotas.ts';
import type { TenantQuotas } from '../quotas.ts';
import type { ServedModel } from '../served-model.ts';
import { readJsonState, syncDir, writeJsonState } from '../state/json-file.ts';

export const ADAPTER_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const MAX_SERVED_ADAPTER_CONFIG_BYTES = 64 * 1024;
const RECORD_FILE = 'record.json';

export interface ServedAdapterRecord {
  name: string;
  tenant: string;
  shared: boolean;
  peftType: string;
  /** Bytes of adapter_model.safetensors. */
  bytes: number;
  /** sha256 of adapter_model.safetensors. */
  sha256: string;
  baseContentHash: string;
  createdAt: string;
}

export interface AdapterUpload {
  name: string;
  shared?: boolean;
  /** Content hash of the model the adapter was trained against, with or without "sha256:". */
  baseContentHash: string;
  /** adapter_config.json as text. */
  config: string;
  /** adapter_model.safetensors bytes. */
  weights: Uint8Array;
}

function isRecord(r: Record<string, unknown> | undefined): r is Record<string, unknown> & ServedAdapterRecord {
  return r !== undefined && typeof r.name === 'string' && ADAPTER_NAME_PATTERN.test(r.name) && typeof r.tenant === 'string' && typeof r.shared === 'boolean'
    && typeof r.bytes === 'number' && typeof r.sha256 === 'string' && typeof r.peftType === 'string' && typeof r.baseContentHash === 'string' && typeof r.createdAt === 'string';
}

/** An upload's name, as the registry keeps it: refused before its files are read. */
export function checkAdapterName(name: string): void {
  if (!ADAPTER_NAME_PATTERN.test(name)) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: `name must match ${ADAPTER_NAME_PATTERN.source}` });
}

/** The content hash an upload was trained against must be the served model's ("sha256:" optional). */
export function checkUploadBase(baseContentHash: string, served: Pick<ServedModel, 'id' | 'contentHash'>): void {
  const bare = (h: string): string => h.replace(/^sha256:/, '').toLowerCase();
  if (bare(baseContentHash) !== bare(served.contentHash)) {
    throw new CloudError('TANDEM_ADAPTER_BASE_MISMATCH', { actual: baseContentHash, model: served.id, expected: served.contentHash });
  }
}

export class AdapterRegistry {
  readonly #root: string;
  /** tenant → name → record */
  readonly #records = new Map<string, Map<string, ServedAdapterRecord>>();
  /**
   * tenant → name → bytes of the uploads being checked and written: counted against the quota
   * with the records (concurrent uploads each saw only the records, and together went over).
   */
  readonly #uploading = new Map<string, Map<string, number>>();
  readonly #removed: ((record: ServedAdapterRecord) => void | Promise<void>)[] = [];
  readonly #added: ((record: ServedAdapterRecord, dir: string) => Promise<void>)[] = [];

  private constructor(root: string) {
    this.#root = root;
  }

  /** Reads the records kept in the state directory; a folder without a valid record is an interrupted upload and is removed. */
  static async open(stateDir: string): Promise<AdapterRegistry> {
    const registry = new AdapterRegistry(join(stateDir, 'serving', 'adapters'));
    await mkdir(registry.#root, { recursive: true, mode: 0o700 });
    for (const tenant of await readdir(registry.#root)) {
      const tenantDir = join(registry.#root, tenant);
      for (const name of await readdir(tenantDir).catch(() => [] as string[])) {
        const dir = join(tenantDir, name);
        const record = await readJsonState(join(dir, RECORD_FILE)).catch(() => undefined);
        if (!isRecord(record) || record.tenant !== tenant || record.name !== name) {
          await rm(dir, { recursive: true, force: true });
          continue;
        }
        registry.#tenant(tenant).set(name, record);
      }
    }
    return registry;
  }

  /**
   * Takes in an adapter another gateway of the cluster stored, once its folder is in this state
   * directory; a folder without a valid record is left unknown. True when it was new here.
   */
  async adopt(tenant: string, name: string): Promise<boolean> {
    if (!ADAPTER_NAME_PATTERN.test(tenant) || !ADAPTER_NAME_PATTERN.test(name) || this.#records.get(tenant)?.has(name)) return false;
    const record = await readJsonState(join(this.#root, tenant, name, RECORD_FILE)).catch(() => undefined);
    if (!isRecord(record) || record.tenant !== tenant || record.name !== name) return false;
    this.#tenant(tenant).set(name, record);
    return true;
  }

  /** Drops an adapter another gateway of the cluster deleted: its folder here, and its resident copy (the onRemoved listeners). */
  async forget(tenant: string, name: string): Promise<void> {
    const record = this.#records.get(tenant)?.get(name);
    if (record === undefined) return;
    this.#records.get(tenant)?.delete(name);
    await rm(this.dirOf(record), { recursive: true, force: true });
    for (const l of this.#removed) await l(record);
  }

  #tenant(tenant: string): Map<string, ServedAdapterRecord> {
    let m = this.#records.get(tenant);
    if (m === undefined) {
      m = new Map();
      this.#records.set(tenant, m);
    }
    return m;
  }

  /** Awaited after an adapter is stored, before the upload is answered (a cluster's object store). */
  onAdded(listener: (record: ServedAdapterRecord, dir: string) => Promise<void>): void {
    this.#added.push(listener);
  }

  /** Called, and awaited, after an adapter is deleted (the resident copy is dropped; a cluster's object store forgets it). */
  onRemoved(listener: (record: ServedAdapterRecord) => void | Promise<void>): void {
    this.#removed.push(listener);
  }

  dirOf(record: ServedAdapterRecord): string {
    return join(this.#root, record.tenant, record.name);
  }

  /** The caller's own adapters, then those other tenants share; `ref` is how the caller names each. */
  visibleTo(tenant: string): { ref: string; record: ServedAdapterRecord }[] {
    const own = [...this.#tenant(tenant).values()].map((record) => ({ ref: record.name, record }));
    const shared = [...this.#records].filter(([t]) => t !== tenant).flatMap(([, m]) => [...m.values()].filter((r) => r.shared).map((record) => ({ ref: `${record.tenant}/${record.name}`, record })));
    return [...own, ...shared];
  }

  /** The adapter `ref` names for the caller: "name" (its own) or "owner/name" (shared); undefined when the caller may not see one. */
  resolve(tenant: string, ref: string): ServedAdapterRecord | undefined {
    const slash = ref.indexOf('/');
    if (slash < 0) return this.#records.get(tenant)?.get(ref);
    const record = this.#records.get(ref.slice(0, slash))?.get(ref.slice(slash + 1));
    return record !== undefined && (record.shared || record.tenant === tenant) ? record : undefined;
  }

  /** Validates an upload against the served model (base content hash, PEFT config, tensor shapes, a servable method) and keeps it. */
  async add(tenant: string, upload: AdapterUpload, served: ServedModel, quotas: TenantQuotas): Promise<ServedAdapterRecord> {
    const { name } = upload;
    checkAdapterName(name);
    const mine = this.#tenant(tenant);
    let uploading = this.#uploading.get(tenant);
    if (mine.has(name) || uploading?.has(name) === true) throw new CloudError('TANDEM_SERVE_ADAPTER_EXISTS', { tenant, name });
    const pending = [...(uploading?.values() ?? [])];
    const held = { count: mine.size + pending.length, bytes: [...mine.values()].reduce((n, r) => n + r.bytes, 0) + pending.reduce((n, b) => n + b, 0) };
    checkServedAdapters(quotas, tenant, held, upload.weights.byteLength);
    // Reserved before the first await; released when the upload is kept or refused.
    if (uploading === undefined) {
      uploading = new Map();
      this.#uploading.set(tenant, uploading);
    }
    uploading.set(name, upload.weights.byteLength);
    try {
      return await this.#validateAndKeep(tenant, upload, served, mine);
    } finally {
      uploading.delete(name);
      if (uploading.size === 0) this.#uploading.delete(tenant);
    }
  }

  async #validateAndKeep(tenant: string, upload: AdapterUpload, served: ServedModel, mine: Map<string, ServedAdapterRecord>): Promise<ServedAdapterRecord> {
    const { name } = upload;
    checkUploadBase(upload.baseContentHash, served);
    const configBytes = Buffer.byteLength(upload.config, 'utf8');
    if (configBytes > MAX_SERVED_ADAPTER_CONFIG_BYTES) throw new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field: `${ADAPTER_CONFIG_FILE} bytes`, actual: configBytes, limit: MAX_SERVED_ADAPTER_CONFIG_BYTES });
    const unsupported = (reason: string): CloudError => new CloudError('TANDEM_SERVE_ADAPTER_UNSUPPORTED', { reason });
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(upload.config) as Record<string, unknown>;
    } catch (err) {
      throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: `${ADAPTER_CONFIG_FILE} is not valid JSON: ${(err as Error).message}` });
    }
    if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: `${ADAPTER_CONFIG_FILE} must hold an object` });
    if (json.peft_type !== 'LORA') throw unsupported(`peft_type ${JSON.stringify(json.peft_type)}: batched serving applies LoRA (peft_type "LORA", DoRA and LoRA-FA included) unmerged`);
    let contents: ReturnType<typeof parseSafetensors>;
    try {
      contents = parseSafetensors(upload.weights, ADAPTER_WEIGHTS_FILE, { maxTensors: MAX_ADAPTER_TENSORS });
    } catch (err) {
      throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: (err as Error).message });
    }
    // Before anything is written or allocated: each stated size a dimension of a tensor sent and
    // within the served model (a rank at most the widest module it targets), the bytes its
    // tensors would take against the limit, the tensors sent against those it declares.
    checkAdapterCost(served, json, contents, MAX_ADAPTER_ALLOCATION_BYTES);
    const dir = join(this.#root, tenant, name);
    const staging = `${dir}.upload-${process.pid}-${Date.now()}`;
    await mkdir(staging, { recursive: true, mode: 0o700 });
    try {
      await writeFile(join(staging, ADAPTER_CONFIG_FILE), upload.config, { mode: 0o600 });
      await writeFile(join(staging, ADAPTER_WEIGHTS_FILE), upload.weights, { mode: 0o600 });
      let adapter;
      try {
        adapter = await loadAdapter(served.model, staging, { maxAllocationBytes: MAX_ADAPTER_ALLOCATION_BYTES });
      } catch (err) {
        throw adapterErrorOf(served, err, (m) => m.split(`${staging}/`).join(''));
      }
      try {
        checkServableHooks(adapter.hooks);
      } catch (err) {
        throw unsupported((err as Error).message);
      } finally {
        adapter.dispose();
      }
      const record: ServedAdapterRecord = {
        name, tenant, shared: upload.shared ?? false, peftType: 'LORA', bytes: upload.weights.byteLength,
        sha256: createHash('sha256').update(upload.weights).digest('hex'), baseContentHash: served.contentHash, createdAt: new Date().toISOString(),
      };
      await writeJsonState(join(staging, RECORD_FILE), record);
      // Another gateway of the cluster may have stored this name meanwhile (adopt).
      if (mine.has(name)) throw new CloudError('TANDEM_SERVE_ADAPTER_EXISTS', { tenant, name });
      await rename(staging, dir);
      await syncDir(join(this.#root, tenant));
      mine.set(name, record);
      for (const l of this.#added) await l(record, dir);
      return record;
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  /** Deletes one of the tenant's own adapters; TANDEM_SERVE_MODEL_UNKNOWN when it has none of that name. */
  async remove(tenant: string, name: string): Promise<ServedAdapterRecord> {
    const mine = this.#records.get(tenant);
    const record = mine?.get(name);
    if (mine === undefined || record === undefined) throw new CloudError('TANDEM_SERVE_MODEL_UNKNOWN', { model: JSON.stringify(name) });
    mine.delete(name);
    await rm(this.dirOf(record), { recursive: true, force: true });
    for (const l of this.#removed) await l(record);
    return record;
  }
}
