// The only module other folders import from edge-client/.
export { EDGE_ERRORS, EdgeError } from './errors.ts';
export type { EdgeErrorCode, EdgeErrorOptions } from './errors.ts';
export { CloudRest, EDGE_FILES, defaultCacheDir, downloadEdgePart, edgeTensorNames, loadEdgePart } from './download.ts';
export type { EdgePart, LoadedEdgePart } from './download.ts';
export { CloudConnection } from './connection.ts';
export type { ConnectionOptions, ConnectionStats } from './connection.ts';
export { CLIENT_BUILD, CloudClient, EdgeSession, connectCloud } from './session.ts';
export type { ConnectCloudOptions, SessionSpec } from './session.ts';
export { RemoteMiddle } from './remote-middle.ts';
export type { MiddleChannel, MiddleTraffic, RemoteMiddleOptions } from './remote-middle.ts';
export { DEFAULT_METHODS, defensesToWire, edgeRecipe, trainEdge } from './train.ts';
export type { EdgeTrainOptions, EdgeTrainResult, WireSummary } from './train.ts';
export { formatBytes, progressPrinter } from './progress.ts';
export type { ProgressMode, ProgressSink } from './progress.ts';
export { OFFSITE_ADAPTER_DIR, OFFSITE_MODEL_DIR, OFFSITE_RUN_DIR, trainOffsite } from './offsite.ts';
export type { OffsiteTrainOptions, OffsiteTrainResult } from './offsite.ts';
export { downloadBundle, uploadAdapter } from './upload.ts';
export type { CloudTarget, DownloadBundleOptions, UploadOptions } from './upload.ts';
