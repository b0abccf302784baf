// Each session's training loss curve as the edge reports it (protocol v1.2's Backward.loss),
// one point per step: the sum of its micro-batches' shares, each micro-batch counted once
// (a recomputed or retried backward replaces its share). Memory only, bounded per session,
// per tenant and in sessions: a tenant's dashboard, not a record. A tenant that churns sessions
// pushes out its own curves, never another tenant's.

/** One step of a session's curve. */
export interface LossPoint {
  step: number;
  /** The step's loss: its reported micro-batches' shares added up. */
  loss: number;
  /** Micro-batches that reported a share. */
  microbatches: number;
}

export interface LossHistoryLimits {
  /** Steps kept per session, the earliest recorded leaving first (2000). */
  pointsPerSession: number;
  /**
   * Sessions with a curve, in all (1024): when full, the least recently reporting curve of the
   * tenant holding the most leaves.
   */
  sessions: number;
  /** Sessions with a curve per tenant (64), the tenant's least recently reporting leaving first. */
  sessionsPerTenant: number;
  /** Micro-batches counted per step (1024); shares of further ones are ignored. */
  microbatchesPerStep: number;
  /** Shares kept per session over all its steps (16384), the earliest steps leaving first: the bound on a session's memory. */
  sharesPerSession: number;
}

export const DEFAULT_LOSS_HISTORY_LIMITS: LossHistoryLimits = { pointsPerSession: 2000, sessions: 1024, sessionsPerTenant: 64, microbatchesPerStep: 1024, sharesPerSession: 16384 };

/** Step → micro-batch → share, in insertion order (for eviction), with the shares counted. */
interface Curve {
  tenant: string;
  steps: Map<number, Map<number, number>>;
  shares: number;
}

export class LossHistory {
  readonly limits: LossHistoryLimits;
  /** Session id → step → micro-batch → share; both maps in insertion order, for eviction. */
  readonly #curves = new Map<string, Curve>();
  /** Tenant → its sessions with a curve. */
  readonly #perTenant = new Map<string, number>();

  constructor(limits: Partial<LossHistoryLimits> = {}) {
    this.limits = { ...DEFAULT_LOSS_HISTORY_LIMITS, ...limits };
  }

  /** Records one micro-batch's share; false when it is not a finite non-zero number (not reported) or over a bound. */
  record(sessionId: string, step: number, microbatch: number, loss: number | undefined, tenant = ''): boolean {
    if (typeof loss !== 'number' || !Number.isFinite(loss) || loss === 0) return false;
    let curve = this.#curves.get(sessionId);
    if (curve === undefined) {
      if ((this.#perTenant.get(tenant) ?? 0) >= this.limits.sessionsPerTenant) this.#evictOldestOf(tenant);
      else if (this.#curves.size >= this.limits.sessions) this.#evictOldestOf(this.#largestTenant());
      curve = { tenant, steps: new Map(), shares: 0 };
      this.#perTenant.set(tenant, (this.#perTenant.get(tenant) ?? 0) + 1);
    } else {
      this.#curves.delete(sessionId);
    }
    this.#curves.set(sessionId, curve);
    let shares = curve.steps.get(step);
    if (shares === undefined) {
      shares = new Map();
      curve.steps.set(step, shares);
      if (curve.steps.size > this.limits.pointsPerSession) this.#dropEarliest(curve);
    }
    if (!shares.has(microbatch)) {
      if (shares.size >= this.limits.microbatchesPerStep) return false;
      while (curve.shares >= this.limits.sharesPerSession && curve.steps.keys().next().value !== step) this.#dropEarliest(curve);
      if (curve.shares >= this.limits.sharesPerSession) return false;
      curve.shares += 1;
    }
    shares.set(microbatch, loss);
    return true;
  }

  #largestTenant(): string {
    let largest = '';
    let most = -1;
    for (const [tenant, n] of this.#perTenant) if (n > most) [largest, most] = [tenant, n];
    return largest;
  }

  /** Forgets the least recently reporting curve of `tenant`. */
  #evictOldestOf(tenant: string): void {
    for (const [id, curve] of this.#curves) {
      if (curve.tenant === tenant) {
        this.#forget(id);
        return;
      }
    }
  }

  #forget(sessionId: string): void {
    const curve = this.#curves.get(sessionId);
    if (curve === undefined) return;
    this.#curves.delete(sessionId);
    const left = (this.#perTenant.get(curve.tenant) ?? 1) - 1;
    if (left > 0) this.#perTenant.set(curve.tenant, left);
    else this.#perTenant.delete(curve.tenant);
  }

  #dropEarliest(curve: Curve): void {
    const first = curve.steps.keys().next().value as number;
    curve.shares -= curve.steps.get(first)?.size ?? 0;
    curve.steps.delete(first);
  }

  /** The session's curve, by step. */
  points(sessionId: string): LossPoint[] {
    const curve = this.#curves.get(sessionId);
    if (curve === undefined) return [];
    const points: LossPoint[] = [];
    for (const [step, shares] of curve.steps) {
      // In micro-batch order, as the edge adds them up.
      const loss = [...shares.keys()].sort((a, b) => a - b).reduce((sum, m) => sum + (shares.get(m) ?? 0), 0);
      points.push({ step, loss, microbatches: shares.size });
    }
    return points.sort((a, b) => a.step - b.step);
  }

  /** Steps on the session's curve. */
  count(sessionId: string): number {
    return this.#curves.get(sessionId)?.steps.size ?? 0;
  }

  /** Forgets the curves of sessions `keep` says no to (sessions the node forgot). */
  retain(keep: (sessionId: string) => boolean): void {
    for (const id of [...this.#curves.keys()]) if (!keep(id)) this.#forget(id);
  }
}
