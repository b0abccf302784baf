// The public surface of cloud-node/. Other folders (cli/, tests) import from here only.
export { DEFAULT_ACTIVATION_TTL_MS, DEFAULT_MEMORY_BUDGET_BYTES, DISCONNECT_REASON_EVENT, startCloudNode } from './node.ts';
export type { CloudNode, CloudNodeOptions, ComputeControl } from './node.ts';
export { CLOUD_ERRORS, CloudError, isCloudErrorCode } from './errors.ts';
export type { CloudErrorCode, CloudErrorDetails } from './errors.ts';
export { ENVELOPE_EVENT } from './data-plane.ts';
export type { EnvelopeAck } from './data-plane.ts';
export { DEFAULT_CLOSED_RETENTION_MS, DEFAULT_CLOSED_SESSIONS_PER_TENANT, DEFAULT_SESSION_IDLE_MS, HELLO_STRING_LIMITS, SERVER_BUILD } from './session-service.ts';
export type { SessionLifetimes } from './session-service.ts';
export { DEFAULT_QUOTAS, QuotaLedger } from './quotas.ts';
export type { QuotaName, TenantQuotas } from './quotas.ts';
export { DEFAULT_EMULATOR_MAX_BUNDLES, DEFAULT_EMULATOR_MAX_BYTES } from './emulator-registry.ts';
export type { EmulatorStorageLimits } from './emulator-registry.ts';
export { ADMIN_TENANT, KEYS_FILE, KeyStore, RESERVED_TENANTS } from './state/key-store.ts';
export type { Caller, KeyRecord, KeyView } from './state/key-store.ts';
export { ensureStateDir } from './state/json-file.ts';
export { SESSIONS_DIR, SESSIONS_FILE } from './state/session-store.ts';
export type { SessionRecord } from './state/session-store.ts';
