// Emulator bundles of the served model, built on request and kept in the state directory
// (`emulators/<key>/`, one folder per content hash, cut, keep and quantization), so a
// restarted node serves what it built before. A bundle is verified whenever it is read.
// The disk they take is bounded: per tenant (the bundles its requests had built, the
// `storedBundles` quota) and in total (count and bytes); the least recently used go first.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, rm, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { EmulatorError, MANIFEST_FILE, emulatorLayout, verifyBundle } from '../emulator/index.ts';
import type { BundleFile, BundleManifest, Quantization } from '../emulator/index.ts';
import { startEmulatorBuild } from './emulator-build-thread.ts';
import type { EmulatorBuildThread } from './emulator-build-thread.ts';
import { CloudError } from './errors.ts';
import { quotaExceeded } from './quotas.ts';
import type { ServedModel } from './served-model.ts';

export const EMULATORS_DIR = 'emulators';
/** Bundles kept in memory, most recently used last. */
const BUNDLES_IN_MEMORY = 4;
const BUNDLE_DIR_PATTERN = /^[0-9a-f]{16}-b\d+-t\d+-k\d+-[a-z0-9]+$/;
/** Folders being built are `.<key>.<hex>`; a hard kill leaves them behind. */
const BUILDING_DIR_PATTERN = /^\.[0-9a-f]{16}-b\d+-t\d+-k\d+-[a-z0-9]+\.[0-9a-f]+$/;

export interface EmulatorStorageLimits {
  /** Bundles on disk, all tenants together. */
  maxBundles: number;
  /** Bytes of bundles on disk, all tenants together. */
  maxBytes: number;
  /** Bundles one tenant's requests may keep built (the tenant's `storedBundles` quota). */
  perTenant: (tenant: string) => number;
}

export const DEFAULT_EMULATOR_MAX_BUNDLES = 32;
export const DEFAULT_EMULATOR_MAX_BYTES = 8 * 1024 ** 3;

interface StoredBundle {
  key: string;
  /** The tenant whose request had it built; null for bundles found on disk at start. */
  owner: string | null;
  bytes: number;
  lastUsed: number;
}

async function folderBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    total += entry.isDirectory() ? await folderBytes(path) : (await stat(path)).size;
  }
  return total;
}

export interface EmulatorRequest {
  keep: number;
  bottom: number;
  top: number;
  quantize: Quantization | null;
}

export interface ServedBundle {
  key: string;
  manifest: BundleManifest;
  /** Every file, manifest.json included, with its size and sha256. */
  files: BundleFile[];
  contents: Map<string, Uint8Array>;
}

export interface EmulatorBuildSettings {
  /** Public text the kept blocks are distilled on (none: layer drop only). */
  distillData?: string;
  distillSteps?: number;
  /** Text for the fidelity report (default: the distillation data's held-out tenth). */
  evalData?: string;
}

/** A CloudError for an EmulatorError about the request; anything else is rethrown. */
export function cloudErrorOf(err: unknown, request: EmulatorRequest, tempDir?: string): unknown {
  if (!(err instanceof EmulatorError)) return err;
  // The folder being built is the node's business: the tenant is told about the request only.
  let reason = err.message; // the code is not part of the message
  if (tempDir !== undefined) reason = reason.split(tempDir).join('<bundle>');
  if (err.code === 'TANDEM_EMULATOR_KEEP_INVALID') return new CloudError('TANDEM_EMULATOR_KEEP_INVALID', { keep: request.keep, reason }, { cause: err });
  if (err.code === 'TANDEM_EMULATOR_OPTION_INVALID') return new CloudError('TANDEM_EMULATOR_OPTION_INVALID', { reason }, { cause: err });
  return err;
}

export class EmulatorRegistry {
  readonly dir: string;
  readonly #settings: EmulatorBuildSettings;
  readonly #memory = new Map<string, ServedBundle>();
  readonly #building = new Map<string, Promise<ServedBundle>>();
  readonly #onDamaged: ((key: string, err: EmulatorError) => void) | undefined;
  readonly #limits: EmulatorStorageLimits;
  /** Bundles on disk, least recently used first. */
  readonly #stored = new Map<string, StoredBundle>();
  /** Builds in progress per tenant: they count against its quota. */
  readonly #buildingBy = new Map<string, number>();
  readonly #listeners: { stored: ((key: string, dir: string) => Promise<void>)[]; evicted: ((key: string, dir: string) => Promise<void>)[] } = { stored: [], evicted: [] };
  /** Builds running, each on a thread of its own. */
  readonly #threads = new Set<EmulatorBuildThread>();
  /** tfjs backends a build's thread tries in turn (the node's, then those that load anywhere). */
  #backends: string[] = ['wasm', 'cpu'];
  #closed = false;

  constructor(stateDir: string, settings: EmulatorBuildSettings = {}, onDamaged?: (key: string, err: EmulatorError) => void, limits: Partial<EmulatorStorageLimits> = {}) {
    this.dir = join(stateDir, EMULATORS_DIR);
    this.#settings = settings;
    this.#onDamaged = onDamaged;
    this.#limits = {
      maxBundles: limits.maxBundles ?? DEFAULT_EMULATOR_MAX_BUNDLES,
      maxBytes: limits.maxBytes ?? DEFAULT_EMULATOR_MAX_BYTES,
      perTenant: limits.perTenant ?? (() => 4),
    };
  }

  /**
   * Reads what is on disk: removes folders a hard kill left mid-build, and takes the stored
   * bundles into the LRU order (the folders' times). Bundles built before the restart count
   * in the totals, no longer against the tenant that had them built.
   */
  async open(): Promise<void> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (cause) {
      if ((cause as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw cause;
    }
    const found: StoredBundle[] = [];
    for (const name of names) {
      const path = join(this.dir, name);
      if (BUILDING_DIR_PATTERN.test(name) || /\.tmp-\d+-[0-9a-f]+$/.test(name)) {
        await rm(path, { recursive: true, force: true });
      } else if (BUNDLE_DIR_PATTERN.test(name)) {
        const s = await stat(path);
        if (!s.isDirectory()) continue;
        // The folder's mtime is its last use (set on every use); who had it built is not kept on disk.
        found.push({ key: name, owner: null, bytes: await folderBytes(path), lastUsed: s.mtimeMs });
      }
    }
    found.sort((a, b) => a.lastUsed - b.lastUsed);
    for (const b of found) this.#stored.set(b.key, b);
    await this.#evictOverTotal();
  }

  /** Awaited after a bundle is built into its folder (a cluster's object store keeps it). */
  /** The tfjs backend the node's thread picked: a build's thread tries it first, then wasm and cpu. */
  useBackends(backends: readonly string[]): void {
    if (backends.length > 0) this.#backends = [...new Set([...backends, 'wasm', 'cpu'])];
  }

  /** Ends the builds running (their requests fail) and refuses new ones. */
  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all([...this.#threads].map((t) => t.stop()));
  }

  onStored(listener: (key: string, dir: string) => Promise<void>): void {
    this.#listeners.stored.push(listener);
  }

  /** Awaited after a bundle's folder is evicted. */
  onEvicted(listener: (key: string, dir: string) => Promise<void>): void {
    this.#listeners.evicted.push(listener);
  }

  /** Keys of the bundles on disk, least recently used first. */
  get storedKeys(): string[] {
    return [...this.#stored.keys()];
  }

  /** Bytes of the bundles on disk. */
  get storedBytes(): number {
    let n = 0;
    for (const b of this.#stored.values()) n += b.bytes;
    return n;
  }

  #touch(key: string): void {
    const b = this.#stored.get(key);
    if (b === undefined) return;
    b.lastUsed = Date.now();
    this.#stored.delete(key);
    this.#stored.set(key, b);
    // The order survives a restart through the folder's times.
    const when = new Date(b.lastUsed);
    utimes(join(this.dir, key), when, when).catch(() => undefined);
  }

  #ownedBy(tenant: string): StoredBundle[] {
    return [...this.#stored.values()].filter((b) => b.owner === tenant);
  }

  async #evict(key: string): Promise<void> {
    this.#stored.delete(key);
    this.#memory.delete(key);
    // A response being sent holds the bundle's bytes in memory: removing the folder does not cut it.
    await rm(join(this.dir, key), { recursive: true, force: true });
    for (const l of this.#listeners.evicted) await l(key, join(this.dir, key));
  }

  /** Evicts the least recently used bundles (never `keep`) until the totals hold. */
  async #evictOverTotal(keep?: string): Promise<void> {
    for (const b of [...this.#stored.values()]) {
      if (this.#stored.size <= this.#limits.maxBundles && this.storedBytes <= this.#limits.maxBytes) break;
      if (b.key !== keep && !this.#building.has(b.key)) await this.#evict(b.key);
    }
  }

  /** Makes room for one more bundle of `tenant`: its own least recently used bundles go first. */
  async #roomFor(tenant: string): Promise<void> {
    const limit = this.#limits.perTenant(tenant);
    const building = this.#buildingBy.get(tenant) ?? 0;
    if (building >= limit) throw quotaExceeded(tenant, 'storedBundles', limit, `${building} emulator bundles of this tenant are being built`);
    for (const b of this.#ownedBy(tenant)) {
      if (this.#ownedBy(tenant).length + building < limit) break;
      await this.#evict(b.key);
    }
  }



  static keyOf(served: ServedModel, r: EmulatorRequest): string {
    return `${served.contentHash.replace(/^sha256:/, '').slice(0, 16)}-b${r.bottom}-t${r.top}-k${r.keep}-${r.quantize ?? 'f32'}`;
  }

  /**
   * The bundle for a request: from memory, from the state directory, or built now (once,
   * however many ask) on behalf of `tenant`, whose quota of stored bundles it counts against.
   */
  async get(served: ServedModel, request: EmulatorRequest, tenant: string): Promise<ServedBundle> {
    // The layout asks only for the model's depth: a keep or cut it refuses costs no thread, no
    // model load, and none of the tenant's bundles (which making room for a build evicts).
    try {
      emulatorLayout(served.config.numHiddenLayers, { bottom: request.bottom, top: request.top }, request.keep);
    } catch (err) {
      throw cloudErrorOf(err, request);
    }
    const key = EmulatorRegistry.keyOf(served, request);
    const kept = this.#memory.get(key);
    if (kept && this.#stored.has(key)) {
      this.#memory.delete(key);
      this.#memory.set(key, kept);
      this.#touch(key);
      return kept;
    }
    let pending = this.#building.get(key);
    if (!pending) {
      pending = this.#load(served, request, key, tenant).finally(() => this.#building.delete(key));
      this.#building.set(key, pending);
    }
    const bundle = await pending;
    this.#memory.set(key, bundle);
    if (this.#memory.size > BUNDLES_IN_MEMORY) this.#memory.delete(this.#memory.keys().next().value as string);
    return bundle;
  }

  async #load(served: ServedModel, request: EmulatorRequest, key: string, tenant: string): Promise<ServedBundle> {
    const dir = join(this.dir, key);
    if (this.#stored.has(key) && await stat(join(dir, MANIFEST_FILE)).then((s) => s.isFile(), () => false)) {
      try {
        const bundle = await this.#read(dir, key);
        this.#touch(key);
        return bundle;
      } catch (err) {
        // A stored bundle that no longer verifies (a damaged disk, a hand edit) is built again.
        if (!(err instanceof EmulatorError)) throw err;
        this.#onDamaged?.(key, err);
      }
    }
    this.#stored.delete(key);
    await this.#roomFor(tenant);
    this.#buildingBy.set(tenant, (this.#buildingBy.get(tenant) ?? 0) + 1);
    try {
      await this.#build(served, request, key, dir);
    } finally {
      const n = (this.#buildingBy.get(tenant) ?? 1) - 1;
      if (n <= 0) this.#buildingBy.delete(tenant);
      else this.#buildingBy.set(tenant, n);
    }
    this.#stored.set(key, { key, owner: tenant, bytes: await folderBytes(dir), lastUsed: Date.now() });
    for (const l of this.#listeners.stored) await l(key, dir);
    await this.#evictOverTotal(key);
    return this.#read(dir, key);
  }

  /**
   * Builds into a temporary folder and renames it into place, so a bundle folder is always
   * complete; the build runs on a thread of its own (emulator-build-thread.ts).
   */
  async #build(served: ServedModel, request: EmulatorRequest, key: string, dir: string): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const building = join(this.dir, `.${key}.${randomBytes(4).toString('hex')}`);
    const s = this.#settings;
    if (this.#closed) throw new CloudError('TANDEM_NODE_CLOSING', { reason: 'no emulator is built' });
    try {
      await mkdir(building); // from the start: a build in progress is on disk as that folder
      const build = startEmulatorBuild({
        modelDir: served.dir,
        modelId: served.id,
        keep: request.keep,
        cut: { bottom: request.bottom, top: request.top },
        quantize: request.quantize,
        outDir: building,
        ...(s.distillData ? { distill: { dataFile: s.distillData, steps: s.distillSteps ?? 100 } } : {}),
        ...(s.evalData ? { evalFile: s.evalData } : {}),
      }, this.#backends);
      this.#threads.add(build);
      try {
        await build.done;
      } finally {
        this.#threads.delete(build);
      }
      await rm(dir, { recursive: true, force: true });
      await rename(building, dir);
    } catch (err) {
      await rm(building, { recursive: true, force: true });
      if (this.#closed) throw new CloudError('TANDEM_NODE_CLOSING', { reason: 'the emulator build was stopped' }, { cause: err });
      throw cloudErrorOf(err, request, building);
    }
  }

  async #read(dir: string, key: string): Promise<ServedBundle> {
    const { manifest, files } = await verifyBundle(dir);
    const manifestBytes = await readFile(join(dir, MANIFEST_FILE));
    const contents = new Map(files);
    contents.set(MANIFEST_FILE, new Uint8Array(manifestBytes));
    const list: BundleFile[] = [...manifest.files, { name: MANIFEST_FILE, bytes: manifestBytes.length, sha256: createHash('sha256').update(manifestBytes).digest('hex') }];
    return { key, manifest, files: list, contents };
  }
}
