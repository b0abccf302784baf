// What the middle's backward needs, kept under a byte budget and a time limit.
//
// An entry holds h_B and, while it fits, the forward's tape (what the middle's backward
// saved), so the backward runs without recomputing the forward. The middle is frozen, so
// h_B alone is enough to recompute: an entry whose tape does not fit keeps h_B only.
// Entries leave least recently used first when the budget is full, when older than the
// time limit, when their backward completes, and when their session closes. Whatever
// left, the edge can resend h_B and the cloud recomputes exactly the same g_B.

import type { TapedForward } from '../model/index.ts';

export type EvictionReason = 'budget' | 'ttl' | 'closed';

export interface CachedActivation {
  sessionId: string;
  step: number;
  microbatch: number;
  /** h_B as decoded from the Forward frame. */
  data: Float32Array;
  shape: [number, number, number];
  /** The forward's tape, when it was kept. */
  tape?: TapedForward;
  storedAt: number;
}

function entryBytes(entry: Pick<CachedActivation, 'data' | 'tape'>): number {
  return entry.data.byteLength + (entry.tape?.savedBytes ?? 0);
}

export interface ActivationCacheOptions {
  budgetBytes: number;
  ttlMs: number;
  now?: () => number;
  onEvict?: (reason: EvictionReason, bytes: number) => void;
  onSize?: (bytes: number) => void;
}

export function activationKey(sessionId: string, step: number, microbatch: number): string {
  return `${sessionId}\u0000${step}\u0000${microbatch}`;
}

export class ActivationCache {
  readonly #entries = new Map<string, CachedActivation>();
  readonly #options: ActivationCacheOptions;
  readonly #now: () => number;
  #bytes = 0;

  constructor(options: ActivationCacheOptions) {
    this.#options = options;
    this.#now = options.now ?? Date.now;
  }

  get bytes(): number {
    return this.#bytes;
  }

  get size(): number {
    return this.#entries.size;
  }

  /** Keeps an activation, evicting the least recently used ones to fit; one larger than the whole budget is not kept. */
  put(entry: Omit<CachedActivation, 'storedAt'>): void {
    const key = activationKey(entry.sessionId, entry.step, entry.microbatch);
    this.#remove(key);
    if (entry.tape && entryBytes(entry) > this.#options.budgetBytes) {
      // Too big with its tape: keep h_B alone, the backward will recompute.
      entry.tape.dispose();
      entry = { ...entry, tape: undefined };
    }
    const bytes = entryBytes(entry);
    if (bytes > this.#options.budgetBytes) {
      this.#options.onEvict?.('budget', bytes);
      return;
    }
    this.sweep();
    for (const [oldKey] of this.#entries) {
      if (this.#bytes + bytes <= this.#options.budgetBytes) break;
      this.#remove(oldKey, 'budget');
    }
    this.#entries.set(key, { ...entry, storedAt: this.#now() });
    this.#bytes += bytes;
    this.#options.onSize?.(this.#bytes);
  }

  /** The activation if it is still here and within the time limit. */
  get(sessionId: string, step: number, microbatch: number): CachedActivation | undefined {
    const key = activationKey(sessionId, step, microbatch);
    const entry = this.#entries.get(key);
    if (entry === undefined) return undefined;
    if (this.#expired(entry)) {
      this.#remove(key, 'ttl');
      return undefined;
    }
    return entry;
  }

  /** Forgets an activation whose backward is done. */
  delete(sessionId: string, step: number, microbatch: number): void {
    this.#remove(activationKey(sessionId, step, microbatch));
  }

  /** Forgets every activation of a session. */
  dropSession(sessionId: string): void {
    for (const [key, entry] of this.#entries) if (entry.sessionId === sessionId) this.#remove(key, 'closed');
  }

  /** Evicts everything past the time limit. */
  sweep(): void {
    for (const [key, entry] of this.#entries) if (this.#expired(entry)) this.#remove(key, 'ttl');
  }

  clear(): void {
    for (const key of [...this.#entries.keys()]) this.#remove(key);
  }

  #expired(entry: CachedActivation): boolean {
    return this.#now() - entry.storedAt > this.#options.ttlMs;
  }

  #remove(key: string, reason?: EvictionReason): void {
    const entry = this.#entries.get(key);
    if (entry === undefined) return;
    this.#entries.delete(key);
    const bytes = entryBytes(entry);
    this.#bytes -= bytes;
    entry.tape?.dispose();
    if (reason !== undefined) this.#options.onEvict?.(reason, bytes);
    this.#options.onSize?.(this.#bytes);
  }
}
