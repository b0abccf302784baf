// cloud-node's NATS cluster: workers that run block ranges of a model, and the gateway's
// executor that reaches them. cloud-node/index.ts re-exports what other folders use.
export { ClusterExecutor } from './cluster-executor.ts';
export type { ClusterExecutorOptions, HopStats } from './cluster-executor.ts';
export { coverRange, parseBlockRange, parseBlockRanges, rangeName } from './block-ranges.ts';
export type { PipelineSegment } from './block-ranges.ts';
export { CLUSTER_ERRORS, ClusterError } from './errors.ts';
export type { ClusterErrorCode } from './errors.ts';
export { ANNOUNCE_INTERVAL_MS, startMiddleWorkerNode } from './middle-worker-node.ts';
export type { MiddleWorkerNode, MiddleWorkerNodeOptions } from './middle-worker-node.ts';
export { WORKER_SILENCE_MS, WorkerDirectory } from './worker-directory.ts';
export { connectNats } from './nats-connection.ts';
export { DEFAULT_NATS_SERVER, launchCluster } from './launcher.ts';
export type { ClusterLaunchOptions, LaunchedCluster } from './launcher.ts';
