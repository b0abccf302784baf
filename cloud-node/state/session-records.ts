// Where session records live, as the session service and the sessions plugin see it: a
// directory on this machine (SessionStore, one process) or a JetStream key-value bucket
// shared by the gateways of a cluster (JetStreamSessionStore).
import type { Caller } from './key-store.ts';
import type { SessionRecord } from './session-store.ts';

export interface SessionRecords {
  /** Every session the caller may see: its tenant's, or all for the admin. */
  list(caller: Caller): SessionRecord[];
  /** Every session, for the node's sweeps. */
  all(): IterableIterator<SessionRecord>;
  readonly size: number;
  readonly openCount: number;
  openCountOf(tenant: string): number;
  /** The session if the caller may touch it; another tenant's is TANDEM_SESSION_UNKNOWN like a missing one. */
  get(caller: Caller, id: string): SessionRecord;
  /** As get, and the session must be open (TANDEM_SESSION_CLOSED). */
  getOpen(caller: Caller, id: string): SessionRecord;
  add(record: SessionRecord): Promise<void>;
  /** Applies `change` and persists the record before returning. */
  update(id: string, change: (s: SessionRecord) => void): Promise<SessionRecord>;
  /** Forgets a closed session. */
  remove(id: string): Promise<void>;
}
