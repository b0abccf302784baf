// The served adapters loaded in memory: loaded on demand from their folders, the least
// recently used one unloaded when more than `capacity` are resident (never one in use).
import { loadAdapter } from '../../model/index.ts';
import type { LlamaModel, PeftAdapter } from '../../model/index.ts';
import type { ServedAdapterRecord } from './adapter-registry.ts';

interface Resident {
  adapter: PeftAdapter;
  users: number;
  /** Deleted meanwhile: unloaded once the last user releases it. */
  dropped: boolean;
}

export class ResidentAdapters {
  readonly #model: LlamaModel;
  readonly #dirOf: (record: ServedAdapterRecord) => string;
  readonly #capacity: number;
  readonly #onCount: (count: number) => void;
  /** Least recently used first. */
  readonly #resident = new Map<string, Resident>();
  readonly #loading = new Map<string, Promise<Resident>>();
  /** Deleted while loading: the load ends dropped (the requests waiting for it use it, then it is unloaded). */
  readonly #droppedWhileLoading = new Set<string>();
  loads = 0;

  constructor(model: LlamaModel, dirOf: (record: ServedAdapterRecord) => string, capacity: number, onCount: (count: number) => void = () => {}) {
    this.#model = model;
    this.#dirOf = dirOf;
    this.#capacity = capacity;
    this.#onCount = onCount;
  }

  static keyOf(record: ServedAdapterRecord): string {
    return `${record.tenant}/${record.name}@${record.sha256}`;
  }

  get count(): number {
    return this.#resident.size;
  }

  /** The adapter, loaded if needed; call release() once the request that uses it ends. */
  async acquire(record: ServedAdapterRecord): Promise<{ adapter: PeftAdapter; release: () => void }> {
    const key = ResidentAdapters.keyOf(record);
    let resident = this.#resident.get(key);
    if (resident === undefined) {
      let loading = this.#loading.get(key);
      if (loading === undefined) {
        loading = loadAdapter(this.#model, this.#dirOf(record)).then((adapter) => {
          this.loads += 1;
          const r: Resident = { adapter, users: 0, dropped: this.#droppedWhileLoading.delete(key) };
          if (!r.dropped) this.#resident.set(key, r);
          return r;
        }).finally(() => {
          this.#loading.delete(key);
          this.#droppedWhileLoading.delete(key);
        });
        this.#loading.set(key, loading);
      }
      resident = await loading;
    }
    if (!resident.dropped) {
      this.#resident.delete(key);
      this.#resident.set(key, resident);
    }
    resident.users += 1;
    this.#evict();
    let released = false;
    const held = resident;
    return {
      adapter: resident.adapter,
      release: () => {
        if (released) return;
        released = true;
        held.users -= 1;
        if (held.dropped && held.users === 0) held.adapter.dispose();
        this.#evict();
      },
    };
  }

  /** A deleted adapter leaves memory (at once, or when its last request ends). */
  drop(record: ServedAdapterRecord): void {
    const key = ResidentAdapters.keyOf(record);
    if (this.#loading.has(key)) this.#droppedWhileLoading.add(key);
    const resident = this.#resident.get(key);
    if (resident === undefined) return;
    this.#resident.delete(key);
    resident.dropped = true;
    if (resident.users === 0) resident.adapter.dispose();
    this.#onCount(this.#resident.size);
  }

  #evict(): void {
    for (const [key, r] of this.#resident) {
      if (this.#resident.size <= this.#capacity) break;
      if (r.users > 0) continue;
      this.#resident.delete(key);
      r.adapter.dispose();
    }
    this.#onCount(this.#resident.size);
  }

  dispose(): void {
    for (const r of this.#resident.values()) r.adapter.dispose();
    this.#resident.clear();
    this.#onCount(0);
  }
}
