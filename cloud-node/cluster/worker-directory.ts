// The gateway's view of the workers: what they announce on ANNOUNCE_SUBJECT, forgotten when
// one says goodbye or is silent for a few announcement intervals. It is the cluster's
// ClusterStatusSource (GET /v1/cluster, /dashboard) and tells the executor which ranges exist.
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import type { ClusterStatusSource, WorkerStatus } from '../cluster-status.ts';
import type { BlockRange } from '../middle-runner.ts';
import { ANNOUNCE_SUBJECT } from './wire.ts';

/** A worker silent for this long is taken for gone. */
export const WORKER_SILENCE_MS = 3500;

/**
 * Workers the directory knows at once. A new one past it makes room by forgetting the silent
 * ones, else it is not taken: forged announcements (200,000 ids held 120 MiB until the next read)
 * cannot grow the gateway without end.
 */
export const MAX_KNOWN_WORKERS = 4096;

interface Known {
  status: WorkerStatus;
  contentHash: string;
}

function int(v: unknown, min: number, max: number): number | undefined {
  return typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max ? v : undefined;
}

function num(v: unknown): number {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : 0;
}

/** An announcement, checked; undefined for anything malformed. */
function announcementOf(data: Uint8Array): (Known & { leaving: boolean }) | undefined {
  if (data.byteLength > 4096) return undefined;
  let v: Record<string, unknown>;
  try {
    v = JSON.parse(Buffer.from(data).toString('utf8')) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null) return undefined;
  const blocks = v.blocks as Record<string, unknown> | undefined;
  const load = (v.load ?? {}) as Record<string, unknown>;
  const start = int(blocks?.start, 0, 65535);
  const end = int(blocks?.end, 1, 65536);
  if (typeof v.id !== 'string' || v.id === '' || v.id.length > 128 || typeof v.model !== 'string' || typeof v.contentHash !== 'string' || start === undefined || end === undefined || end <= start) return undefined;
  return {
    leaving: v.leaving === true,
    contentHash: v.contentHash.slice(0, 80),
    status: {
      id: v.id, model: v.model.slice(0, 128), blocks: { start, end },
      load: { queued: num(load.queued), running: num(load.running), tokensPerSecond: num(load.tokensPerSecond) },
      lastSeenMs: Date.now(),
    },
  };
}

export class WorkerDirectory implements ClusterStatusSource {
  readonly #known = new Map<string, Known>();
  readonly #sub: Subscription;
  readonly #contentHash: string;
  #listeners: (() => void)[] = [];

  constructor(nc: NatsConnection, contentHash: string) {
    this.#contentHash = contentHash;
    this.#sub = nc.subscribe(ANNOUNCE_SUBJECT, {
      callback: (err, msg) => {
        if (err !== null) return;
        const a = announcementOf(msg.data);
        if (a === undefined) return;
        if (a.leaving) this.#known.delete(a.status.id);
        else {
          if (!this.#known.has(a.status.id) && this.#known.size >= MAX_KNOWN_WORKERS) this.#live();
          if (!this.#known.has(a.status.id) && this.#known.size >= MAX_KNOWN_WORKERS) return;
          this.#known.set(a.status.id, { status: a.status, contentHash: a.contentHash });
        }
        const listeners = this.#listeners;
        this.#listeners = [];
        for (const l of listeners) l();
      },
    });
  }

  #live(): Known[] {
    const since = Date.now() - WORKER_SILENCE_MS;
    for (const [id, k] of this.#known) if (k.status.lastSeenMs < since) this.#known.delete(id);
    return [...this.#known.values()];
  }

  /** Every live worker, any model. */
  async workers(): Promise<WorkerStatus[]> {
    return this.#live().map((k) => structuredClone(k.status)).sort((a, b) => a.blocks.start - b.blocks.start || a.id.localeCompare(b.id));
  }

  /** The worker announced itself within WORKER_SILENCE_MS. */
  isLive(id: string): boolean {
    const k = this.#known.get(id);
    return k !== undefined && k.status.lastSeenMs >= Date.now() - WORKER_SILENCE_MS;
  }

  /** Live workers of the served model. */
  servingWorkers(): WorkerStatus[] {
    return this.#live().filter((k) => k.contentHash === this.#contentHash).map((k) => k.status);
  }

  /** The distinct ranges live workers of the served model own. */
  ranges(): BlockRange[] {
    const seen = new Map<string, BlockRange>();
    for (const w of this.servingWorkers()) seen.set(`${w.blocks.start}-${w.blocks.end}`, w.blocks);
    return [...seen.values()];
  }

  /** Resolves at the next announcement (or after `ms`). */
  changed(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.#listeners.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  close(): void {
    this.#sub.unsubscribe();
    for (const l of this.#listeners) l();
    this.#listeners = [];
  }
}
