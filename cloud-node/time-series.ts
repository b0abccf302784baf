// The node's recent history for the operator's view: one point per interval (a second by
// default) in a bounded ring, each the rate or mean over the interval before it, read from the
// node's Prometheus counters (metrics.ts), the trained-token count and the process's memory.
import { CloudError } from './errors.ts';
import type { CloudMetrics } from './metrics.ts';

/** One interval of the node's work. */
export interface SeriesPoint {
  /** Unix milliseconds at the end of the interval. */
  t: number;
  /** Trained tokens since the node started, at `t`. */
  trainedTokens: number;
  trainedTokensPerSecond: number;
  /** Tensor frame bytes per second, received and sent together, by codec. */
  frameBytesPerSecond: Record<string, number>;
  /** Mean compute time of the middle's Forwards and Backwards in the interval; null when none ran. */
  stepLatencyMs: { forward: number | null; backward: number | null };
  memory: { rssBytes: number; heapUsedBytes: number; heapTotalBytes: number };
}

/** The counters since the node started. */
export interface SeriesTotals {
  trainedTokens: number;
  steps: { forward: number; backward: number };
  /** Tensor frame bytes by codec and direction. */
  frameBytes: Record<string, { in: number; out: number }>;
}

export interface TimeSeriesOptions {
  metrics: CloudMetrics;
  trainedTokens: () => number;
  /** 1000 ms. */
  intervalMs?: number;
  /** Points kept (300: five minutes at one a second). */
  points?: number;
}

interface Reading {
  t: number;
  totals: SeriesTotals;
  latency: Record<'forward' | 'backward', { sum: number; count: number }>;
}

const KINDS = ['forward', 'backward'] as const;

function checkedOption(option: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) throw new CloudError('TANDEM_OPTION_INVALID', { option, value: JSON.stringify(value), reason: `must be an integer in ${min}..${max}` });
  return value;
}

export class TimeSeries {
  readonly intervalMs: number;
  readonly capacity: number;
  readonly #options: TimeSeriesOptions;
  readonly #ring: SeriesPoint[] = [];
  #next = 0;
  #previous: Reading;
  #timer: NodeJS.Timeout | undefined;
  #sampling = false;

  constructor(options: TimeSeriesOptions) {
    this.#options = options;
    this.intervalMs = checkedOption('series.intervalMs', options.intervalMs ?? 1000, 10, 3_600_000);
    this.capacity = checkedOption('series.points', options.points ?? 300, 1, 100_000);
    // The node's counters start at zero with it.
    this.#previous = { t: Date.now(), totals: { trainedTokens: 0, steps: { forward: 0, backward: 0 }, frameBytes: {} }, latency: { forward: { sum: 0, count: 0 }, backward: { sum: 0, count: 0 } } };
  }

  /** Samples every interval until `stop` (the timer does not keep the process alive). */
  start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => {
      if (this.#sampling) return;
      this.#sampling = true;
      this.sample().catch(() => undefined).finally(() => { this.#sampling = false; });
    }, this.intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** The points kept, oldest first. */
  points(): SeriesPoint[] {
    return [...this.#ring.slice(this.#next), ...this.#ring.slice(0, this.#next)];
  }

  /** Mean trained tokens per second over the last `window` points (0 before the first). */
  recentTokensPerSecond(window = 5): number {
    const recent = this.points().slice(-window);
    return recent.length === 0 ? 0 : recent.reduce((n, p) => n + p.trainedTokensPerSecond, 0) / recent.length;
  }

  async totals(): Promise<SeriesTotals> {
    return (await this.#read(Date.now())).totals;
  }

  /** Takes one point now (the timer calls it) and returns it. */
  async sample(now = Date.now()): Promise<SeriesPoint> {
    const reading = await this.#read(now);
    const before = this.#previous;
    this.#previous = reading;
    const seconds = Math.max(now - before.t, 1) / 1000;
    const frameBytesPerSecond: Record<string, number> = {};
    for (const [codec, bytes] of Object.entries(reading.totals.frameBytes)) {
      const earlier = before.totals.frameBytes[codec] ?? { in: 0, out: 0 };
      frameBytesPerSecond[codec] = (bytes.in + bytes.out - earlier.in - earlier.out) / seconds;
    }
    const meanMs = (kind: 'forward' | 'backward'): number | null => {
      const count = reading.latency[kind].count - before.latency[kind].count;
      return count > 0 ? ((reading.latency[kind].sum - before.latency[kind].sum) / count) * 1000 : null;
    };
    const memory = process.memoryUsage();
    const point: SeriesPoint = {
      t: now,
      trainedTokens: reading.totals.trainedTokens,
      trainedTokensPerSecond: (reading.totals.trainedTokens - before.totals.trainedTokens) / seconds,
      frameBytesPerSecond,
      stepLatencyMs: { forward: meanMs('forward'), backward: meanMs('backward') },
      memory: { rssBytes: memory.rss, heapUsedBytes: memory.heapUsed, heapTotalBytes: memory.heapTotal },
    };
    if (this.#ring.length < this.capacity) {
      this.#ring.push(point);
    } else {
      this.#ring[this.#next] = point;
      this.#next = (this.#next + 1) % this.capacity;
    }
    return point;
  }

  async #read(t: number): Promise<Reading> {
    const { metrics } = this.#options;
    const [steps, frames, latency] = await Promise.all([metrics.steps.get(), metrics.frameBytes.get(), metrics.latency.get()]);
    const totals: SeriesTotals = { trainedTokens: this.#options.trainedTokens(), steps: { forward: 0, backward: 0 }, frameBytes: {} };
    for (const v of steps.values) {
      const kind = v.labels.kind;
      if (kind === 'forward' || kind === 'backward') totals.steps[kind] = v.value;
    }
    for (const v of frames.values) {
      const codec = String(v.labels.codec);
      const direction = v.labels.direction;
      if (direction !== 'in' && direction !== 'out') continue;
      totals.frameBytes[codec] ??= { in: 0, out: 0 };
      totals.frameBytes[codec][direction] += v.value;
    }
    const lat = { forward: { sum: 0, count: 0 }, backward: { sum: 0, count: 0 } };
    for (const v of latency.values) {
      const kind = v.labels.kind;
      if (!KINDS.includes(kind as 'forward')) continue;
      const k = kind as 'forward' | 'backward';
      if (v.metricName?.endsWith('_sum')) lat[k].sum = v.value;
      else if (v.metricName?.endsWith('_count')) lat[k].count = v.value;
    }
    return { t, totals, latency: lat };
  }
}
