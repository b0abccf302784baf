// Emulator bundles of the served model, built on request and kept in the state directory
// (`emulators/<key>/`, one folder per content hash, cut, keep and quantization), so a
// restarted node serves what it built before. A bundle is verified whenever it is read.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { EmulatorError, MANIFEST_FILE, buildEmulator, verifyBundle } from '../emulator/index.ts';
import type { BundleFile, BundleManifest, Quantization } from '../emulator/index.ts';
import { CloudError } from './errors.ts';
import type { ServedModel } from './served-model.ts';

export const EMULATORS_DIR = 'emulators';
/** Bundles kept in memory, most recently used last. */
const BUNDLES_IN_MEMORY = 4;

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
export function cloudErrorOf(err: unknown, request: EmulatorRequest): unknown {
  if (!(err instanceof EmulatorError)) return err;
  const reason = err.message; // the code is not part of the message
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

  constructor(stateDir: string, settings: EmulatorBuildSettings = {}, onDamaged?: (key: string, err: EmulatorError) => void) {
    this.dir = join(stateDir, EMULATORS_DIR);
    this.#settings = settings;
    this.#onDamaged = onDamaged;
  }

  static keyOf(served: ServedModel, r: EmulatorRequest): string {
    return `${served.contentHash.replace(/^sha256:/, '').slice(0, 16)}-b${r.bottom}-t${r.top}-k${r.keep}-${r.quantize ?? 'f32'}`;
  }

  /** The bundle for a request: from memory, from the state directory, or built now (once, however many ask). */
  async get(served: ServedModel, request: EmulatorRequest): Promise<ServedBundle> {
    const key = EmulatorRegistry.keyOf(served, request);
    const kept = this.#memory.get(key);
    if (kept) {
      this.#memory.delete(key);
      this.#memory.set(key, kept);
      return kept;
    }
    let pending = this.#building.get(key);
    if (!pending) {
      pending = this.#load(served, request, key).finally(() => this.#building.delete(key));
      this.#building.set(key, pending);
    }
    const bundle = await pending;
    this.#memory.set(key, bundle);
    if (this.#memory.size > BUNDLES_IN_MEMORY) this.#memory.delete(this.#memory.keys().next().value as string);
    return bundle;
  }

  async #load(served: ServedModel, request: EmulatorRequest, key: string): Promise<ServedBundle> {
    const dir = join(this.dir, key);
    if (await stat(join(dir, MANIFEST_FILE)).then((s) => s.isFile(), () => false)) {
      try {
        return await this.#read(dir, key);
      } catch (err) {
        // A stored bundle that no longer verifies (a damaged disk, a hand edit) is built again.
        if (!(err instanceof EmulatorError)) throw err;
        this.#onDamaged?.(key, err);
      }
    }
    await this.#build(served, request, key, dir);
    return this.#read(dir, key);
  }

  /** Builds into a temporary folder and renames it into place, so a bundle folder is always complete. */
  async #build(served: ServedModel, request: EmulatorRequest, key: string, dir: string): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const building = join(this.dir, `.${key}.${randomBytes(4).toString('hex')}`);
    const s = this.#settings;
    try {
      await buildEmulator({
        modelDir: served.dir,
        modelId: served.id,
        keep: request.keep,
        cut: { bottom: request.bottom, top: request.top },
        quantize: request.quantize,
        outDir: building,
        ...(s.distillData ? { distill: { dataFile: s.distillData, steps: s.distillSteps ?? 100 } } : {}),
        ...(s.evalData ? { evalFile: s.evalData } : {}),
      });
      await rm(dir, { recursive: true, force: true });
      await rename(building, dir);
    } catch (err) {
      await rm(building, { recursive: true, force: true });
      throw cloudErrorOf(err, request);
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
