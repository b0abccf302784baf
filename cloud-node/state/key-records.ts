// Where API keys live (their sha256 only), as auth, the keys plugin and the data plane see
// it: keys.json in the state directory (KeyStore) or a JetStream key-value bucket shared by
// the gateways of a cluster (JetStreamKeyStore).
import type { Caller, KeyRecord, KeyView } from './key-store.ts';

export interface KeyRecords {
  readonly records: KeyRecord[];
  /** A key of the admin that is not revoked exists. */
  readonly hasAdmin: boolean;
  list(): Promise<KeyView[]>;
  /** `listener` is called once for every key revoked from now on, here or elsewhere. */
  onRevoked(listener: (record: KeyRecord) => void): void;
  /** Creates a key; the key itself is returned once, only its hash is kept. */
  create(tenant: string, options?: { admin?: boolean }): Promise<{ record: KeyRecord; key: string }>;
  revoke(idOrPrefix: string): Promise<KeyView>;
  authenticate(key: unknown): Promise<Caller>;
  /** Picks up changes made elsewhere; true when there were some. */
  reloadIfChanged(): Promise<boolean>;
}
