// The model a node serves: its weights, what the edge may download of it, and the cuts it allows.
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import {
  CONFIG_FILE, LlamaModel, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, loadModelFolder, onEdge, safetensorsLayout,
} from '../model/index.ts';
import type { LoadedModel, ModelConfig, SafetensorsEntryInput } from '../model/index.ts';
import { DEFAULT_CUT, EDGE_WEIGHTS_FILE } from '../protocol/index.ts';
import type { Cut, CutLimits, FileEntry } from '../protocol/index.ts';
import { CloudError } from './errors.ts';

/** One of the model's weights (a tfjs variable). */
type Tensor = NonNullable<ReturnType<LlamaModel['weights']['get']>>;

/** Edge bundles kept built, most recently used last. */
const EDGE_BUNDLES_KEPT = 4;
/** Bytes read out of a tensor and hashed between two turns of the event loop while a bundle is built. */
const BUILD_SLICE_BYTES = 4 << 20;

export interface EdgeBundle {
  cut: Cut;
  files: FileEntry[];
  /** Each file as the pieces it is sent in, in order. */
  contents: Map<string, Uint8Array[]>;
}

/** A tensor's values as float32 pieces of at most `maxBytes` (whole rows along its first axis). */
function* pieces(w: Tensor, maxBytes: number): Generator<Float32Array> {
  const rows = w.shape[0] ?? 1;
  const rowBytes = (w.size / Math.max(rows, 1)) * 4;
  if (w.rank === 0 || w.size * 4 <= maxBytes) {
    yield w.dataSync() as Float32Array;
    return;
  }
  const step = Math.max(1, Math.floor(maxBytes / rowBytes));
  for (let r = 0; r < rows; r += step) {
    const slice = w.slice(r, Math.min(step, rows - r));
    try {
      yield slice.dataSync() as Float32Array;
    } finally {
      slice.dispose();
    }
  }
}

function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

async function readIfExists(path: string): Promise<Uint8Array | undefined> {
  try {
    if (!(await stat(path)).isFile()) return undefined;
  } catch {
    return undefined;
  }
  return readFile(path);
}

export class ServedModel {
  readonly id: string;
  readonly dir: string;
  readonly config: ModelConfig;
  /** config.json as the folder has it. */
  readonly rawConfig: Record<string, unknown>;
  /** "sha256:<hex>" of what the weights compute (model/'s content hash). */
  readonly contentHash: string;
  /** The whole model as tfjs variables; the executor runs its middle blocks. */
  readonly model: LlamaModel;
  /** The folder's config and tokenizer files, sent with every cut's part, and their listing (hashed once). */
  readonly #sideFiles: Map<string, Uint8Array>;
  readonly #sideEntries: FileEntry[];
  readonly #bundles = new Map<string, EdgeBundle>();
  /** Builds asked for and not finished, by cut: a second request for a cut waits on the first. */
  readonly #building = new Map<string, Promise<EdgeBundle>>();
  /** The end of the last build queued: builds run one after another, so at most one is half-made. */
  #lastBuild: Promise<unknown> = Promise.resolve();

  private constructor(id: string, loaded: LoadedModel, rawConfig: Record<string, unknown>, sideFiles: Map<string, Uint8Array>) {
    this.id = id;
    this.dir = loaded.dir;
    this.config = loaded.config;
    this.rawConfig = rawConfig;
    this.contentHash = `sha256:${loaded.contentHash}`;
    this.#sideFiles = sideFiles;
    this.#sideEntries = [...sideFiles].map(([name, bytes]) => ({ name, bytes: bytes.byteLength, sha256: sha256(bytes) }));
    this.model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  }

  /** Loads a Hugging Face model folder; the id is the folder's base name unless given. */
  static async load(dir: string, id?: string): Promise<ServedModel> {
    const loaded = await loadModelFolder(dir);
    const configBytes = await readFile(join(dir, CONFIG_FILE));
    const rawConfig = JSON.parse(Buffer.from(configBytes).toString('utf8')) as Record<string, unknown>;
    const sideFiles = new Map<string, Uint8Array>([[CONFIG_FILE, configBytes]]);
    for (const name of [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]) {
      const bytes = await readIfExists(join(dir, name));
      if (bytes !== undefined) sideFiles.set(name, bytes);
    }
    return new ServedModel(id ?? basename(resolve(dir)), loaded, rawConfig, sideFiles);
  }

  get numLayers(): number {
    return this.config.numHiddenLayers;
  }

  /** The middle keeps at least one block. */
  get cutLimits(): CutLimits {
    return { minBottom: 0, minTop: 1, maxBottomPlusTop: this.numLayers - 1 };
  }

  /** The default cut (2, 2) clipped so the middle keeps a block. */
  get defaultCut(): Cut {
    const max = this.cutLimits.maxBottomPlusTop;
    const top = Math.max(1, Math.min(DEFAULT_CUT.top, max));
    const bottom = Math.max(0, Math.min(DEFAULT_CUT.bottom, max - top));
    return { bottom, top };
  }

  /** Throws TANDEM_CUT_INVALID unless the cut leaves the edge a top block and the cloud a middle block. */
  checkCut(cut: Cut): void {
    const { bottom, top } = cut;
    const limits = this.cutLimits;
    const fail = (reason: string): CloudError => new CloudError('TANDEM_CUT_INVALID', { bottom, top, reason });
    if (!Number.isInteger(bottom) || bottom < limits.minBottom) throw fail(`bottom must be an integer >= ${limits.minBottom}`);
    if (!Number.isInteger(top) || top < limits.minTop) throw fail(`top must be an integer >= ${limits.minTop}`);
    if (bottom + top > limits.maxBottomPlusTop) throw fail(`bottom + top must be at most ${limits.maxBottomPlusTop} (the model has ${this.numLayers} blocks)`);
  }

  /** Blocks [start, end) the cloud runs for a cut. */
  middleOf(cut: Cut): { start: number; end: number } {
    return { start: cut.bottom, end: this.numLayers - cut.top };
  }

  /** The checked content hash: the client's may be bare hex or "sha256:<hex>"; empty means "any". */
  checkContentHash(expected: string): void {
    if (expected === '') return;
    const bare = (h: string): string => h.replace(/^sha256:/, '').toLowerCase();
    if (bare(expected) !== bare(this.contentHash)) {
      throw new CloudError('TANDEM_MODEL_MISMATCH', { model: this.id, actual: this.contentHash, expected });
    }
  }

  /**
   * The files the edge downloads for a cut, built once per cut and kept for the next download.
   * A build reads the edge's tensors out and hashes them (~0.1 s for SmolLM-135M at cut 2/2,
   * more for larger models) a slice of at most 4 MiB per turn of the event loop, so the node's
   * other sessions go on meanwhile (it stalled the loop 180-240 ms in one go); builds for
   * different cuts run one after another, and concurrent requests for one cut share its build.
   */
  async edgeBundle(cut: Cut): Promise<EdgeBundle> {
    this.checkCut(cut);
    const key = `${cut.bottom}:${cut.top}`;
    const built = this.#bundles.get(key);
    if (built !== undefined) {
      this.#bundles.delete(key);
      this.#bundles.set(key, built);
      return built;
    }
    let building = this.#building.get(key);
    if (building === undefined) {
      building = this.#lastBuild.then(() => this.#buildBundle({ bottom: cut.bottom, top: cut.top }));
      this.#lastBuild = building.catch(() => undefined);
      this.#building.set(key, building);
      building.then((bundle) => {
        this.#bundles.set(key, bundle);
        if (this.#bundles.size > EDGE_BUNDLES_KEPT) this.#bundles.delete(this.#bundles.keys().next().value as string);
      }, () => undefined).finally(() => this.#building.delete(key));
    }
    return building;
  }

  /**
   * The edge's weights file, read out of the model's tensors a slice at a time (the arrays the
   * folder was read into are not kept beside them: on the wasm backend, a second copy of the
   * whole model) and hashed as it goes, and the bundle's listing.
   */
  async #buildBundle(cut: Cut): Promise<EdgeBundle> {
    const entries = new Map<string, SafetensorsEntryInput>();
    for (const [name, w] of this.model.weights) if (onEdge(name, cut, this.numLayers)) entries.set(name, { dtype: 'F32', shape: w.shape });
    const layout = safetensorsLayout(entries, { format: 'pt', contentHash: this.contentHash, bottom: String(cut.bottom), top: String(cut.top) });
    const parts: Uint8Array[] = [layout.head];
    const hash = createHash('sha256').update(layout.head);
    for (const name of layout.offsets.keys()) {
      for (const values of pieces(this.model.weights.get(name) as Tensor, BUILD_SLICE_BYTES)) {
        const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
        parts.push(bytes);
        hash.update(bytes);
        await nextTurn();
      }
    }
    const contents = new Map<string, Uint8Array[]>([[EDGE_WEIGHTS_FILE, parts], ...[...this.#sideFiles].map(([name, bytes]): [string, Uint8Array[]] => [name, [bytes]])]);
    return { cut, contents, files: [{ name: EDGE_WEIGHTS_FILE, bytes: layout.byteLength, sha256: hash.digest('hex') }, ...this.#sideEntries] };
  }

  dispose(): void {
    this.model.dispose();
  }
}
