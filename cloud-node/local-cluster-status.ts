// The operator view's workers when the node is one process: itself, one worker running every
// middle block a session may ask for, loaded by its middle executor's queue.
import { hostname } from 'node:os';
import type { ClusterStatusSource, WorkerStatus } from './cluster-status.ts';
import type { ModelSlot } from './context.ts';

export interface LocalClusterStatusOptions {
  model: ModelSlot;
  /** Recent trained tokens per second (the node's time series). */
  tokensPerSecond: () => number;
}

export class LocalClusterStatus implements ClusterStatusSource {
  readonly id = `${hostname()}:${process.pid}`;
  readonly #options: LocalClusterStatusOptions;

  constructor(options: LocalClusterStatusOptions) {
    this.#options = options;
  }

  /** This process once its model is loaded; none before. */
  async workers(): Promise<WorkerStatus[]> {
    const { model } = this.#options;
    if (!model.loaded) return [];
    const { served, executor } = model.get();
    const cuts = served.cutLimits;
    return [{
      id: this.id,
      model: served.id,
      // The widest middle any cut leaves: [minBottom, L - minTop).
      blocks: { start: cuts.minBottom, end: served.numLayers - cuts.minTop },
      load: { queued: executor.queued, running: executor.running, tokensPerSecond: this.#options.tokensPerSecond() },
      lastSeenMs: Date.now(),
    }];
  }
}
