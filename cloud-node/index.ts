// The public surface of cloud-node/. Other folders (cli/, tests) import from here only.
export { DEFAULT_ACTIVATION_TTL_MS, DEFAULT_MEMORY_BUDGET_BYTES, startCloudNode } from './node.ts';
export type { CloudNode, CloudNodeOptions, ComputeControl } from './node.ts';
export { CLOUD_ERRORS, CloudError, isCloudErrorCode } from './errors.ts';
export type { CloudErrorCode, CloudErrorDetails } from './errors.ts';
export { ENVELOPE_EVENT } from './data-plane.ts';
export type { EnvelopeAck } from './data-plane.ts';
export { EDGE_WEIGHTS_FILE } from './served-model.ts';
export { SERVER_BUILD } from './session-service.ts';
export { ADMIN_TENANT, KEYS_FILE, KeyStore } from './state/key-store.ts';
export type { Caller, KeyRecord } from './state/key-store.ts';
export { SESSIONS_FILE } from './state/session-store.ts';
export type { SessionRecord } from './state/session-store.ts';
