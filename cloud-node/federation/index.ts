// The federation coordinator of a cloud node.
export { COORDINATOR_ERRORS, CoordinatorError } from './errors.ts';
export type { CoordinatorErrorCode } from './errors.ts';
export { Coordinator, FEDERATIONS_DIR, adapterFromWire, adapterToWire, sampleOwners } from './coordinator.ts';
export type { CoordinatorOptions } from './coordinator.ts';
