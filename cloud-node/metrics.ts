// Prometheus metrics of one node, in a registry of its own (several nodes may share a process).
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EvictionReason } from './activation-cache.ts';
import type { BatchInfo } from './middle-executor.ts';

export type StepKind = 'forward' | 'backward';
export type Direction = 'in' | 'out';

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export class CloudMetrics {
  readonly registry = new Registry();
  readonly sessionsOpen: Gauge;
  readonly sessionsCreated: Counter;
  readonly steps: Counter;
  readonly replays: Counter;
  readonly frameBytes: Counter;
  readonly messageBytes: Counter;
  readonly latency: Histogram;
  readonly cacheBytes: Gauge;
  readonly replyBytes: Gauge;
  readonly evictions: Counter;
  readonly recomputes: Counter;
  readonly errors: Counter;
  readonly connections: Gauge;
  readonly computeRestarts: Counter;
  readonly computeReady: Gauge;
  readonly batchRequests: Histogram;
  readonly batchTokens: Histogram;
  readonly queueWait: Histogram;
  readonly heldAdapters: Gauge;
  readonly heldAdapterBytes: Gauge;
  readonly heldCommits: Counter;
  readonly feedbackBytes: Gauge;
  /** What tandem_feedback_bytes reads at each scrape (the session service sets it): nothing is counted per step. */
  feedbackBytesNow: () => number = () => 0;
  readonly evaluationWorkerStops: Counter;

  constructor(options: { defaultMetrics?: boolean } = {}) {
    const registers = [this.registry];
    this.sessionsOpen = new Gauge({ name: 'tandem_sessions_open', help: 'Sessions open on this node', registers });
    this.sessionsCreated = new Counter({ name: 'tandem_sessions_created_total', help: 'Sessions created by a Hello', registers });
    this.steps = new Counter({ name: 'tandem_steps_total', help: 'Forward and Backward requests computed (retries answered from the reply cache are not counted)', labelNames: ['kind'], registers });
    this.replays = new Counter({ name: 'tandem_step_replays_total', help: 'Retried Forward and Backward requests answered from the reply cache', labelNames: ['kind'], registers });
    this.frameBytes = new Counter({ name: 'tandem_frame_bytes_total', help: 'Tensor frame bytes (payload and codec parameters) received and sent, by codec', labelNames: ['direction', 'codec'], registers });
    this.messageBytes = new Counter({ name: 'tandem_message_bytes_total', help: 'Envelope bytes received and sent on the socket, chunks included', labelNames: ['direction'], registers });
    this.latency = new Histogram({ name: 'tandem_step_seconds', help: 'Time to compute a Forward or Backward of the middle', labelNames: ['kind'], buckets: LATENCY_BUCKETS, registers });
    this.cacheBytes = new Gauge({ name: 'tandem_activation_cache_bytes', help: 'Bytes of activations kept for backward', registers });
    this.replyBytes = new Gauge({ name: 'tandem_reply_cache_bytes', help: 'Bytes of encoded replies kept for retries (within the memory budget of the activations)', registers });
    this.evictions = new Counter({ name: 'tandem_activation_evictions_total', help: 'Activations dropped before their backward, by reason (reason="reply": kept replies dropped by the budget, the time limit or a close)', labelNames: ['reason'], registers });
    this.recomputes = new Counter({ name: 'tandem_recomputes_total', help: 'Backwards computed from an h_B the edge resent because the cloud no longer had it', registers });
    this.errors = new Counter({ name: 'tandem_errors_total', help: 'Errors returned to clients, by code', labelNames: ['code'], registers });
    this.connections = new Gauge({ name: 'tandem_socket_connections', help: 'socket.io connections open', registers });
    this.computeRestarts = new Counter({ name: 'tandem_compute_restarts_total', help: 'Compute workers restarted after they died or their backend failed', registers });
    this.computeReady = new Gauge({ name: 'tandem_compute_ready', help: '1 while every compute worker has the model loaded, 0 while one restarts', registers });
    this.batchRequests = new Histogram({ name: 'tandem_batch_requests', help: 'Requests coalesced into one backbone call, by kind (forward, backwardFromTape, backward)', labelNames: ['kind'], buckets: [1, 2, 4, 8, 16, 32, 64], registers });
    this.batchTokens = new Histogram({ name: 'tandem_batch_tokens', help: 'Tokens (batch x sequence) of one backbone call, by kind', labelNames: ['kind'], buckets: [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], registers });
    this.queueWait = new Histogram({ name: 'tandem_queue_wait_seconds', help: 'Time a Forward or Backward waited in its queue before its batch went to a worker', labelNames: ['kind'], buckets: LATENCY_BUCKETS, registers });
    this.heldAdapters = new Gauge({ name: 'tandem_held_adapters', help: 'Middle adapters the node holds for sessions (protocol 1.3)', registers });
    this.heldAdapterBytes = new Gauge({ name: 'tandem_held_adapter_bytes', help: 'Bytes of the held middle adapters, weights and AdamW state', registers });
    this.heldCommits = new Counter({ name: 'tandem_held_commits_total', help: 'StepCommits answered, by outcome (applied, repeat)', labelNames: ['outcome'], registers });
    this.feedbackBytes = new Gauge({
      name: 'tandem_feedback_bytes', help: 'Bytes of the gradient codec\'s error-feedback residuals kept, all sessions together (each tenant\'s held to its feedbackBytes quota)', registers,
      collect: () => { this.feedbackBytes.set(this.feedbackBytesNow()); },
    });
    this.evaluationWorkerStops = new Counter({ name: 'tandem_adapter_evaluation_worker_stops_total', help: 'Adapter-evaluation worker threads stopped other than idle: a crash, an evaluation past its time limit, a failed backend', registers });
    this.evaluationWorkerStops.inc(0);
    for (const kind of ['forward', 'backward']) {
      this.steps.inc({ kind }, 0);
      this.replays.inc({ kind }, 0);
    }
    for (const reason of ['budget', 'ttl', 'closed', 'reply'] satisfies EvictionReason[]) this.evictions.inc({ reason }, 0);
    if (options.defaultMetrics) collectDefaultMetrics({ register: this.registry, prefix: 'tandem_process_' });
  }

  /** A batch the executor handed a worker. */
  batch(info: BatchInfo): void {
    this.batchRequests.observe({ kind: info.kind }, info.requests);
    this.batchTokens.observe({ kind: info.kind }, info.tokens);
    for (const wait of info.waitSeconds) this.queueWait.observe({ kind: info.kind }, wait);
  }

  /** The held adapters resident now (held-adapters.ts reports every change). */
  resident(count: number, bytes: number): void {
    this.heldAdapters.set(count);
    this.heldAdapterBytes.set(bytes);
  }

  frame(direction: Direction, codec: string, bytes: number): void {
    this.frameBytes.inc({ direction, codec }, bytes);
  }
}
