// Session metadata, kept in <state>/sessions.json and rewritten atomically on every change
// that is acknowledged to a client (open, a new step, close), so a restarted node knows
// every session it ever welcomed. Activations and cached replies are memory only.
import { join } from 'node:path';
import type { CloseReason, CodecChoice, Cut, Limits, ProtocolVersion, TrainingSpec } from '../../protocol/index.ts';
import { CloudError } from '../errors.ts';
import type { Caller } from './key-store.ts';
import { readJsonState, WriteQueue, writeJsonState } from './json-file.ts';

export const SESSIONS_FILE = 'sessions.json';

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
  clientBuild: string;
  state: SessionState;
  /** The highest step a Forward or Backward completed for; -1 before the first. */
  lastStep: number;
  createdAt: string;
  updatedAt: string;
  closedAt?: string;
  closeReason?: CloseReason;
}

function isRecord(v: unknown): v is SessionRecord {
  const r = v as Partial<SessionRecord> | null;
  return typeof r === 'object' && r !== null && typeof r.id === 'string' && typeof r.tenant === 'string' && typeof r.modelId === 'string'
    && typeof r.lastStep === 'number' && (r.state === 'open' || r.state === 'closed') && typeof r.cut === 'object' && typeof r.codecs === 'object'
    && typeof r.limits === 'object';
}

export class SessionStore {
  readonly path: string;
  readonly #sessions = new Map<string, SessionRecord>();
  readonly #writes = new WriteQueue();

  private constructor(path: string) {
    this.path = path;
  }

  static async open(stateDir: string): Promise<SessionStore> {
    const store = new SessionStore(join(stateDir, SESSIONS_FILE));
    const raw = await readJsonState(store.path);
    if (raw !== undefined) {
      if (!Array.isArray(raw.sessions)) throw new CloudError('TANDEM_STATE_INVALID', { file: store.path, reason: 'sessions must be an array' });
      for (const item of raw.sessions) {
        if (!isRecord(item)) throw new CloudError('TANDEM_STATE_INVALID', { file: store.path, reason: `a session record is malformed: ${JSON.stringify(item).slice(0, 200)}` });
        store.#sessions.set(item.id, item);
      }
    }
    return store;
  }

  /** Every session the caller may see: its tenant's, or all for the admin. */
  list(caller: Caller): SessionRecord[] {
    return [...this.#sessions.values()].filter((s) => caller.admin || s.tenant === caller.tenant);
  }

  get openCount(): number {
    let n = 0;
    for (const s of this.#sessions.values()) if (s.state === 'open') n++;
    return n;
  }

  /**
   * The session if the caller may touch it. Another tenant's session is reported exactly
   * like a missing one (TANDEM_SESSION_UNKNOWN), so its existence does not leak.
   */
  get(caller: Caller, id: string): SessionRecord {
    const s = this.#sessions.get(id);
    if (s === undefined || (!caller.admin && s.tenant !== caller.tenant)) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
    return s;
  }

  /** As get, and the session must be open. */
  getOpen(caller: Caller, id: string): SessionRecord {
    const s = this.get(caller, id);
    if (s.state !== 'open') throw new CloudError('TANDEM_SESSION_CLOSED', { session: id });
    return s;
  }

  async add(record: SessionRecord): Promise<void> {
    this.#sessions.set(record.id, record);
    await this.#persist();
  }

  /** Applies `change` to the session and persists it before returning. */
  async update(id: string, change: (s: SessionRecord) => void): Promise<SessionRecord> {
    const s = this.#sessions.get(id);
    if (s === undefined) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
    change(s);
    s.updatedAt = new Date().toISOString();
    await this.#persist();
    return s;
  }

  #persist(): Promise<void> {
    return this.#writes.run(() => writeJsonState(this.path, { version: 1, sessions: [...this.#sessions.values()] }));
  }
}
