// One federation's whole state, as the coordinator keeps it and a federation store persists it:
// configuration, the global adapter, the open round (sampled owners, deadline, the updates
// in), the finished rounds, the DP accountant and the secure aggregation of the open attempt.
import type { AdvertisedKeys, EncryptedShare, RevealedShares } from '../../model/index.ts';
import type { AccountantState, Layout } from '../../model/index.ts';
import type { FederationCreate, RoundRecord, SecAggPhase } from '../../protocol/index.ts';

export interface PendingUpdate {
  examples: number;
  values: string;
  loss: number;
  validation?: { loss: number; accuracy?: number };
  bytes: number;
}

export interface FederationRecord {
  config: Omit<FederationCreate, 'adapter'>;
  adapterConfig: string;
  layout: Layout;
  /** The global adapter, flat, base64 float32. */
  global: string;
  state: 'open' | 'done' | 'stopped';
  round: number;
  attempt: number;
  sampled: string[];
  deadline: number;
  received: Record<string, PendingUpdate>;
  bytesSent: number;
  history: RoundRecord[];
  accountant: AccountantState;
  fedAdam?: { m: string; v: string; round: number };
  rejected: Record<string, number>;
  stopReason?: string;
  secagg?: SecAggRound;
}

/** The secure aggregation of the open round attempt (SecAgg: keys, shares, masked inputs, reveal). */
export interface SecAggRound {
  phase: SecAggPhase;
  threshold: number;
  advertised: Record<string, AdvertisedKeys>;
  /** Encrypted shares by sender. */
  shares: Record<string, EncryptedShare[]>;
  /** Masked inputs, base64 uint32. */
  masked: Record<string, string>;
  survivors: string[];
  reveals: Record<string, RevealedShares>;
}

/** Enough of a record's shape to be believed when read back from a file or a bucket. */
export function isFederationRecord(value: unknown): value is FederationRecord {
  const r = value as Partial<FederationRecord> | null;
  return typeof r === 'object' && r !== null && typeof r.config === 'object' && r.config !== null && typeof r.config.id === 'string'
    && typeof r.global === 'string' && typeof r.round === 'number' && typeof r.attempt === 'number'
    && typeof r.received === 'object' && r.received !== null && Array.isArray(r.history) && Array.isArray(r.sampled);
}
