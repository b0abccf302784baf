// Session metadata, one record file per session in <state>/sessions/<id>.json, written
// atomically (fsync) on every change acknowledged to a client (open, a new step, close), so a
// restarted node knows every session it welcomed. A step rewrites its own session's small
// record only: the write cost does not grow with the number of sessions. Closed sessions are
// pruned (their files removed) after a retention time. Activations and cached replies are
// memory only. A `sessions.json` of earlier builds is read once and split into records.
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { CloseReason, CodecChoice, Cut, Defense, Limits, ProtocolVersion, TrainingSpec } from '../../protocol/index.ts';
import { CloudError } from '../errors.ts';
import type { Caller } from './key-store.ts';
import { OpenSessionCounts, sessionFor, visibleTo } from './session-access.ts';
import { ensureStateDir, readJsonState, syncDir, tidyStateDir, KeyedWriteQueue, writeJsonState } from './json-file.ts';

/** The single file of earlier builds, migrated into SESSIONS_DIR at start. */
export const SESSIONS_FILE = 'sessions.json';
export const SESSIONS_DIR = 'sessions';
const RECORD_PATTERN = /^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.json$/;

export type SessionState = 'open' | 'closed';

export interface SessionRecord {
  id: string;
  tenant: string;
  modelId: string;
  contentHash: string;
  version: ProtocolVersion;
  cut: Cut;
  codecs: CodecChoice;
  limits: Limits;
  training: TrainingSpec;
  allowNonFinite: boolean;
  /** v1.1: the defenses the edge offered and the node accepted; Welcome echoes them. */
  defenses?: Defense[];
  clientBuild: string;
  state: SessionState;
  /** The highest step a Forward or Backward completed for; -1 before the first. */
  lastStep: number;
  createdAt: string;
  updatedAt: string;
  closedAt?: string;
  closeReason?: CloseReason;
}

/** A record as stored (a file, a JetStream entry): checked before it is believed. */
export function isSessionRecord(v: unknown): v is SessionRecord {
  const r = v as Partial<SessionRecord> | null;
  return typeof r === 'object' && r !== null && typeof r.id === 'string' && RECORD_PATTERN.test(`${r.id}.json`) && typeof r.tenant === 'string'
    && typeof r.modelId === 'string' && typeof r.lastStep === 'number' && (r.state === 'open' || r.state === 'closed') && typeof r.cut === 'object'
    && typeof r.codecs === 'object' && typeof r.limits === 'object' && typeof r.updatedAt === 'string';
}

export class SessionStore {
  /** The folder of record files. */
  readonly dir: string;
  readonly #sessions = new Map<string, SessionRecord>();
  readonly #open = new OpenSessionCounts();
  readonly #writes = new KeyedWriteQueue();
  #dirReady = false;

  private constructor(dir: string) {
    this.dir = dir;
  }

  static async open(stateDir: string): Promise<SessionStore> {
    const store = new SessionStore(join(stateDir, SESSIONS_DIR));
    await tidyStateDir(store.dir);
    let names: string[] = [];
    try {
      names = await readdir(store.dir);
      store.#dirReady = true;
    } catch (cause) {
      if ((cause as NodeJS.ErrnoException).code !== 'ENOENT') throw new CloudError('TANDEM_STATE_INVALID', { file: store.dir, reason: (cause as Error).message }, { cause });
    }
    for (const name of names) {
      const match = RECORD_PATTERN.exec(name);
      if (match === null) continue;
      const path = join(store.dir, name);
      const item = await readJsonState(path);
      if (!isSessionRecord(item) || item.id !== match[1]) throw new CloudError('TANDEM_STATE_INVALID', { file: path, reason: 'the session record is malformed' });
      store.#remember(item);
    }
    await store.#migrate(join(stateDir, SESSIONS_FILE));
    return store;
  }

  /** Splits the single sessions.json of earlier builds into record files, then removes it. */
  async #migrate(legacy: string): Promise<void> {
    const raw = await readJsonState(legacy);
    if (raw === undefined) return;
    if (!Array.isArray(raw.sessions)) throw new CloudError('TANDEM_STATE_INVALID', { file: legacy, reason: 'sessions must be an array' });
    for (const item of raw.sessions) {
      if (!isSessionRecord(item)) throw new CloudError('TANDEM_STATE_INVALID', { file: legacy, reason: `a session record is malformed: ${JSON.stringify(item).slice(0, 200)}` });
    }
    for (const item of raw.sessions as SessionRecord[]) {
      if (this.#sessions.has(item.id)) continue; // written by an interrupted migration
      this.#remember(item);
      await this.#persist(item);
    }
    await rm(legacy, { force: true });
  }

  #remember(record: SessionRecord): void {
    const before = this.#sessions.get(record.id);
    if (before?.state === 'open') this.#countOpen(before.tenant, -1);
    this.#sessions.set(record.id, record);
    if (record.state === 'open') this.#countOpen(record.tenant, 1);
  }

  #countOpen(tenant: string, delta: number): void {
    this.#open.add(tenant, delta);
  }

  /** Every session the caller may see: its tenant's, or all for the admin. */
  list(caller: Caller): SessionRecord[] {
    return [...this.#sessions.values()].filter((s) => visibleTo(caller, s));
  }

  /** Every session, for the node's sweeps. */
  all(): IterableIterator<SessionRecord> {
    return this.#sessions.values();
  }

  get size(): number {
    return this.#sessions.size;
  }

  get openCount(): number {
    return this.#open.total;
  }

  openCountOf(tenant: string): number {
    return this.#open.of(tenant);
  }

  /**
   * The session if the caller may touch it. Another tenant's session is reported exactly
   * like a missing one (TANDEM_SESSION_UNKNOWN), so its existence does not leak.
   */
  get(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#sessions.get(id));
  }

  /** As get, and the session must be open. */
  getOpen(caller: Caller, id: string): SessionRecord {
    return sessionFor(caller, id, this.#sessions.get(id), true);
  }

  async add(record: SessionRecord): Promise<void> {
    this.#remember(record);
    await this.#persist(record);
  }

  /** Applies `change` to the session and persists its record before returning. */
  async update(id: string, change: (s: SessionRecord) => void): Promise<SessionRecord> {
    const s = this.#sessions.get(id);
    if (s === undefined) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
    const wasOpen = s.state === 'open';
    change(s);
    if (wasOpen && s.state !== 'open') this.#countOpen(s.tenant, -1);
    s.updatedAt = new Date().toISOString();
    await this.#persist(s);
    return s;
  }

  /** Forgets a closed session and removes its record file. */
  async remove(id: string): Promise<void> {
    const s = this.#sessions.get(id);
    if (s === undefined) return;
    if (s.state === 'open') throw new CloudError('TANDEM_INTERNAL', { reason: `session ${id} is open; close it before removing it` });
    this.#sessions.delete(id);
    await this.#writes.run(id, async () => {
      await rm(this.#path(id), { force: true });
      await syncDir(this.dir);
    });
  }

  #path(id: string): string {
    return join(this.dir, `${id}.json`);
  }

  async #persist(record: SessionRecord): Promise<void> {
    if (!this.#dirReady) {
      await ensureStateDir(this.dir);
      this.#dirReady = true;
    }
    // The write takes the record as it is when its turn comes: the latest state wins.
    await this.#writes.run(record.id, () => (this.#sessions.has(record.id) ? writeJsonState(this.#path(record.id), record) : Promise.resolve()));
  }
}
