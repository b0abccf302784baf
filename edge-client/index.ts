// The only module other folders import from edge-client/.
export { EDGE_ERRORS, EdgeError } from './errors.ts';
export type { EdgeErrorCode, EdgeErrorOptions } from './errors.ts';
export { CloudRest, EDGE_FILES, EDGE_WEIGHTS_FILE, defaultCacheDir, downloadEdgePart, edgeTensorNames, loadEdgePart } from './download.ts';
export type { EdgeManifest, EdgePart, LoadedEdgePart, ModelInfo } from './download.ts';
export { CloudConnection } from './connection.ts';
export type { ConnectionOptions, ConnectionStats } from './connection.ts';
export { CLIENT_BUILD, CloudClient, EdgeSession, connectCloud } from './session.ts';
export type { ConnectCloudOptions, SessionSpec } from './session.ts';
export { ACTIVATIONS_GONE, RemoteMiddle } from './remote-middle.ts';
export type { MiddleTraffic, RemoteMiddleOptions } from './remote-middle.ts';
export { evaluate } from './evaluate.ts';
export type { EvalResult } from './evaluate.ts';
export { DEFAULT_METHODS, exportAdapter, trainEdge } from './train.ts';
export type { EdgeTrainOptions, EdgeTrainResult, TrainEvent, WireSummary } from './train.ts';
export { formatBytes, progressPrinter } from './progress.ts';
export type { ProgressMode, ProgressSink } from './progress.ts';
