// What the middle's backward needs, and the replies kept for retries, under one byte budget
// and a time limit.
//
// An entry holds h_B and, while it fits, the forward's tape (what the middle's backward
// saved), so the backward runs without recomputing the forward. The middle is frozen, so
// h_B alone is enough to recompute: an entry whose tape does not fit keeps h_B only.
// Entries leave least recently used first when the budget is full, when older than the
// time limit, when their backward completes, and when their session closes. Whatever
// left, the edge can resend h_B and the cloud recomputes exactly the same g_B.
//
// A reply kept for retries is its encoded envelope only, counted in the same budget and
// bounded per session; a retry whose reply left is computed again (a Forward as it was, a
// Backward from the h_B the edge resends).

import type { KeptTape } from './middle-executor.ts';

/** Why an activation left before its backward; 'reply' counts kept replies that left for any reason. */
export type EvictionReason = 'budget' | 'ttl' | 'closed' | 'reply';

export interface CachedActivation {
  sessionId: string;
  step: number;
  microbatch: number;
  /** h_B as decoded from the Forward frame. */
  data: Float32Array;
  shape: [number, number, number];
  /** The forward's tape, when it was kept. */
  tape?: KeptTape;
  storedAt: number;
}

/** An encoded reply envelope kept so that a retry gets the same bytes. */
export interface KeptReply {
  sessionId: string;
  /** Which reply of the session, e.g. "forward:3:0". */
  key: string;
  step: number;
  requestId: string;
  bytes: Uint8Array;
  storedAt: number;
}

type Entry = ({ kind: 'activation' } & CachedActivation) | ({ kind: 'reply' } & KeptReply);

function entryBytes(entry: Pick<CachedActivation, 'data' | 'tape'>): number {
  return entry.data.byteLength + (entry.tape?.savedBytes ?? 0);
}

function bytesOf(entry: Entry): number {
  return entry.kind === 'activation' ? entryBytes(entry) : entry.bytes.byteLength;
}

export const DEFAULT_REPLIES_PER_SESSION = 64;

export interface ActivationCacheOptions {
  budgetBytes: number;
  ttlMs: number;
  now?: () => number;
  onEvict?: (reason: EvictionReason, bytes: number) => void;
  /** Bytes of activations, and of kept replies (together within the budget). */
  onSize?: (activationBytes: number, replyBytes: number) => void;
  /** Replies kept per session; the oldest leaves first. */
  maxRepliesPerSession?: number;
}

export function activationKey(sessionId: string, step: number, microbatch: number): string {
  return `${sessionId}\u0000${step}\u0000${microbatch}`;
}

function replyEntryKey(sessionId: string, key: string): string {
  return `${sessionId}\u0000reply\u0000${key}`;
}

export class ActivationCache {
  readonly #entries = new Map<string, Entry>();
  /** Entry keys of each session's kept replies, oldest first. */
  readonly #replies = new Map<string, Set<string>>();
  #activations = 0;
  #replyBytes = 0;
  readonly #options: ActivationCacheOptions;
  readonly #now: () => number;
  #bytes = 0;

  constructor(options: ActivationCacheOptions) {
    this.#options = options;
    this.#now = options.now ?? Date.now;
  }

  /** Bytes held, activations and replies. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Activations kept. */
  get size(): number {
    return this.#activations;
  }

  /** Replies kept, all sessions together, and their bytes. */
  get replies(): { count: number; bytes: number } {
    let count = 0;
    for (const keys of this.#replies.values()) count += keys.size;
    return { count, bytes: this.#replyBytes };
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
    this.#insert(key, { kind: 'activation', ...entry, storedAt: this.#now() });
  }

  /** Keeps an encoded reply for retries (replacing one under the same key), within the budget and the per-session bound. */
  putReply(reply: Omit<KeptReply, 'storedAt'>): void {
    const key = replyEntryKey(reply.sessionId, reply.key);
    this.#remove(key);
    const max = this.#options.maxRepliesPerSession ?? DEFAULT_REPLIES_PER_SESSION;
    const kept = this.#replies.get(reply.sessionId);
    if (kept !== undefined) for (const old of kept) {
      if (kept.size < max) break;
      this.#remove(old, 'budget');
    }
    this.#insert(key, { kind: 'reply', ...reply, storedAt: this.#now() });
  }

  /** A kept reply, if it is still here and within the time limit. */
  getReply(sessionId: string, key: string): KeptReply | undefined {
    const entryKey = replyEntryKey(sessionId, key);
    const entry = this.#entries.get(entryKey);
    if (entry === undefined || entry.kind !== 'reply') return undefined;
    if (this.#expired(entry)) {
      this.#remove(entryKey, 'ttl');
      return undefined;
    }
    return entry;
  }

  /** Forgets the replies of a session for which `drop` says so. */
  dropReplies(sessionId: string, drop: (reply: KeptReply) => boolean): void {
    const kept = this.#replies.get(sessionId);
    if (kept === undefined) return;
    for (const key of [...kept]) {
      const entry = this.#entries.get(key);
      if (entry?.kind === 'reply' && drop(entry)) this.#remove(key);
    }
  }

  /**
   * Replies are the cheapest to lose (a retry recomputes): an activation evicts replies before
   * older activations, and a reply evicts only older replies, never an activation.
   */
  #insert(key: string, entry: Entry): void {
    const bytes = bytesOf(entry);
    if (bytes > this.#options.budgetBytes) {
      this.#options.onEvict?.(entry.kind === 'reply' ? 'reply' : 'budget', bytes);
      return;
    }
    this.sweep();
    const fits = (): boolean => this.#bytes + bytes <= this.#options.budgetBytes;
    for (const [oldKey, old] of this.#entries) {
      if (fits()) break;
      if (old.kind === 'reply') this.#remove(oldKey, 'budget');
    }
    if (entry.kind === 'reply' && !fits()) return;
    for (const [oldKey] of this.#entries) {
      if (fits()) break;
      this.#remove(oldKey, 'budget');
    }
    this.#entries.set(key, entry);
    this.#bytes += bytes;
    if (entry.kind === 'activation') this.#activations++;
    else {
      this.#replyBytes += bytes;
      let kept = this.#replies.get(entry.sessionId);
      if (kept === undefined) {
        kept = new Set();
        this.#replies.set(entry.sessionId, kept);
      }
      kept.add(key);
    }
    this.#reportSize();
  }

  #reportSize(): void {
    this.#options.onSize?.(this.#bytes - this.#replyBytes, this.#replyBytes);
  }

  /** The activation if it is still here and within the time limit. */
  get(sessionId: string, step: number, microbatch: number): CachedActivation | undefined {
    const key = activationKey(sessionId, step, microbatch);
    const entry = this.#entries.get(key);
    if (entry === undefined || entry.kind !== 'activation') return undefined;
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

  /** Forgets every activation and reply of a session. */
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

  #expired(entry: Entry): boolean {
    return this.#now() - entry.storedAt > this.#options.ttlMs;
  }

  #remove(key: string, reason?: EvictionReason): void {
    const entry = this.#entries.get(key);
    if (entry === undefined) return;
    this.#entries.delete(key);
    const bytes = bytesOf(entry);
    this.#bytes -= bytes;
    if (entry.kind === 'activation') {
      this.#activations--;
      entry.tape?.dispose();
    } else {
      this.#replyBytes -= bytes;
      const kept = this.#replies.get(entry.sessionId);
      kept?.delete(key);
      if (kept?.size === 0) this.#replies.delete(entry.sessionId);
    }
    if (reason !== undefined) this.#options.onEvict?.(entry.kind === 'reply' ? 'reply' : reason, bytes);
    this.#reportSize();
  }
}
