// What each gateway of a cluster spends per tenant, in the JetStream bucket `tandem-quota-usage`
// (one entry per gateway and tenant): every gateway reports its own tokens in flight and bytes
// of the current minute, and counts the others' against the tenant's tokensInFlight and
// bytesPerMinute quotas, so that G gateways do not give a tenant G times each. The counts are
// as fresh as the last report (REPORT_MS): a tenant spending on several gateways at once may go
// over by what one report interval lets through. A report older than STALE_MS (its gateway
// gone without closing) no longer counts.
import { createHash } from 'node:crypto';
import { nuid } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import type { QuotaLedger, QuotaPeers, SharedUsage } from '../quotas.ts';
import { JetStreamBucket } from './jetstream-bucket.ts';
import type { JetStreamStateOptions } from './jetstream-bucket.ts';

export const QUOTA_USAGE_BUCKET = 'tandem-quota-usage';

/** How often a gateway reports what changed. */
export const REPORT_MS = 250;

/** A report older than this is a gateway gone: it no longer counts. */
export const STALE_MS = 5_000;

/** How long close waits for JetStream to take the deletes of this gateway's reports. */
const CLOSE_WAIT_MS = 1_000;

interface UsageRecord extends SharedUsage {
  gateway: string;
  tenant: string;
  /** When it was reported (ms, the reporting gateway's clock). */
  at: number;
}

function isUsageRecord(v: unknown): v is UsageRecord {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  const count = (x: unknown): boolean => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  return typeof r.gateway === 'string' && typeof r.tenant === 'string' && r.tenant.length <= 256 && count(r.tokens) && count(r.windowBytes) && count(r.windowEndsAt) && count(r.at);
}

const keyOf = (gateway: string, tenant: string): string => `${gateway}-${createHash('sha256').update(tenant).digest('hex').slice(0, 32)}`;

export interface QuotaUsageOptions extends JetStreamStateOptions {
  /** Report interval (REPORT_MS). */
  reportMs?: number;
}

export class JetStreamQuotaUsage implements QuotaPeers {
  readonly gateway = nuid.next();
  readonly #bucket: JetStreamBucket<UsageRecord>;
  /** The bucket's reports by tenant, then key: what a check reads (every data-plane message makes one). */
  readonly #byTenant: Map<string, Map<string, UsageRecord>>;
  readonly #ledger: QuotaLedger;
  /** What this gateway last reported, by tenant (to report changes only). */
  readonly #reported = new Map<string, string>();
  readonly #timer: NodeJS.Timeout;
  #reporting: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(bucket: JetStreamBucket<UsageRecord>, byTenant: Map<string, Map<string, UsageRecord>>, ledger: QuotaLedger, reportMs: number) {
    this.#bucket = bucket;
    this.#byTenant = byTenant;
    this.#ledger = ledger;
    this.#timer = setInterval(() => void this.report(), reportMs);
    this.#timer.unref();
  }

  /** Opens the bucket and counts the other gateways' reports in `ledger` from now on. */
  static async open(nc: NatsConnection, ledger: QuotaLedger, options: QuotaUsageOptions = {}): Promise<JetStreamQuotaUsage> {
    const byTenant = new Map<string, Map<string, UsageRecord>>();
    const bucket = await JetStreamBucket.open<UsageRecord>(nc, QUOTA_USAGE_BUCKET, {
      replicas: options.replicas,
      markerGraceMs: options.markerGraceMs,
      parse: (value, key) => (isUsageRecord(value) && keyOf(value.gateway, value.tenant) === key ? value : undefined),
      onInvalid: options.onInvalid,
      onWatch: (state, reason) => options.onWatch?.(QUOTA_USAGE_BUCKET, state, reason),
      onChange: (key, before, after) => {
        if (before !== undefined) {
          const reports = byTenant.get(before.tenant);
          reports?.delete(key);
          if (reports?.size === 0) byTenant.delete(before.tenant);
        }
        if (after !== undefined) {
          let reports = byTenant.get(after.tenant);
          if (reports === undefined) byTenant.set(after.tenant, (reports = new Map()));
          reports.set(key, after);
        }
      },
    });
    const usage = new JetStreamQuotaUsage(bucket, byTenant, ledger, options.reportMs ?? REPORT_MS);
    ledger.sharedWith(usage);
    void nc.closed().then(() => usage.close());
    return usage;
  }

  /** The other gateways' fresh reports of `tenant`, summed. */
  usage(tenant: string, now = Date.now()): { tokens: number; windowBytes: number } {
    let tokens = 0;
    let windowBytes = 0;
    for (const r of this.#byTenant.get(tenant)?.values() ?? []) {
      if (r.gateway === this.gateway || now - r.at > STALE_MS) continue;
      tokens += r.tokens;
      if (now < r.windowEndsAt) windowBytes += r.windowBytes;
    }
    return { tokens, windowBytes };
  }

  /** Reports what changed since the last report (a tenant back to nothing: its entry is deleted); a report at least every STALE_MS / 2 keeps the rest fresh. */
  report(now = Date.now()): Promise<void> {
    this.#reporting = this.#reporting.then(async () => {
      if (this.#closed) return;
      for (const [tenant, u] of this.#ledger.shared(now)) {
        const idle = u.tokens === 0 && u.windowBytes === 0;
        const shown = idle ? 'idle' : `${u.tokens}/${u.windowBytes}/${u.windowEndsAt}`;
        const last = this.#reported.get(tenant);
        if (idle && last === undefined) {
          this.#reported.set(tenant, shown); // never reported: nothing to delete
          continue;
        }
        const fresh = this.#bucket.get(keyOf(this.gateway, tenant));
        if (last === shown && (idle || (fresh !== undefined && now - fresh.at < STALE_MS / 2))) continue;
        try {
          if (idle) await this.#bucket.delete(keyOf(this.gateway, tenant));
          else await this.#bucket.put(keyOf(this.gateway, tenant), { gateway: this.gateway, tenant, ...u, at: now });
          this.#reported.set(tenant, shown);
        } catch {
          // JetStream unavailable for now: the next report tries again.
        }
      }
    });
    return this.#reporting;
  }

  /**
   * Stops reporting and deletes this gateway's reports, waiting at most CLOSE_WAIT_MS for
   * JetStream (a server that is down leaves them to go stale); a report still in flight may land
   * after, and goes stale in turn.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    const deletes = [...this.#reported].filter(([, shown]) => shown !== 'idle').map(([tenant]) => this.#bucket.delete(keyOf(this.gateway, tenant)).catch(() => undefined));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(deletes), new Promise((resolve) => { timer = setTimeout(resolve, CLOSE_WAIT_MS); })]);
    clearTimeout(timer);
    this.#bucket.close();
  }
}
