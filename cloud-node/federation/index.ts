// The federation coordinator of a cloud node.
export { COORDINATOR_ERRORS, CoordinatorError } from './errors.ts';
export type { CoordinatorErrorCode } from './errors.ts';
export { Coordinator, adapterFromWire, adapterToWire, sampleOwners } from './coordinator.ts';
export { DirectoryFederationStore, FEDERATIONS_DIR } from './directory-federation-store.ts';
export { FEDERATIONS_BUCKET, JetStreamFederationStore, LARGE_FEDERATIONS_BUCKET } from './jetstream-federation-store.ts';
export type { FederationStore } from './federation-store.ts';
export type { FederationRecord } from './federation-record.ts';
export type { CoordinatorOptions, FederationBodyKind } from './coordinator.ts';
