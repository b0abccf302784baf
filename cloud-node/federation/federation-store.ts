// Where a coordinator keeps its federations: one record per federation, written whole before an
// update is acknowledged. The embedded default is a folder of the state directory (one
// process); a cluster's gateways share a JetStream key-value bucket.
import type { FederationRecord } from './federation-record.ts';

export interface FederationStore {
  /**
   * Whether other writers (a cluster's other gateways) save these federations too: their owners'
   * calls are not seen here, so a coordinator on a shared store cannot tell an owner gone.
   */
  readonly shared: boolean;
  /** Every stored federation, as it was last saved. */
  load(): Promise<FederationRecord[]>;
  /** Stores `record` (a snapshot the caller no longer changes); durable once it resolves. */
  save(record: FederationRecord): Promise<void>;
  /**
   * Called with a federation another writer (another gateway) saved, newer than what this one
   * last saved or saw; a store with one writer never calls it.
   */
  onRemoteChange?: (record: FederationRecord) => void;
  close(): void;
}
