// What the operator's view (GET /v1/cluster, /dashboard) knows of the compute workers: which
// block ranges each serves and how loaded it is. One process reports itself as one worker; a
// NATS cluster's gateway reports the workers that announce themselves on NATS.

/** One compute worker: a process that owns blocks [start, end) of a served model. */
export interface WorkerStatus {
  /** Stable for the worker's lifetime, e.g. "host:pid" or a NATS client name. */
  id: string;
  /** The served model's id. */
  model: string;
  /** Blocks [start, end) of the model that the worker runs. */
  blocks: { start: number; end: number };
  /** Requests waiting and running on the worker now, and its recent trained tokens per second. */
  load: { queued: number; running: number; tokensPerSecond: number };
  /** Unix milliseconds of its last report. */
  lastSeenMs: number;
}

/** Where the node's operator view reads the workers from. */
export interface ClusterStatusSource {
  workers(): Promise<WorkerStatus[]>;
}
