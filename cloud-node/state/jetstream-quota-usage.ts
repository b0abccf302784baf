// What each gateway of a cluster spends per tenant, in the JetStream bucket `tandem-quota-usage`
// (one entry per gateway and tenant): every gateway reports its own tokens in flight and bytes
// of the current minute, and counts the others' against the tenant's tokensInFlight and
// bytesPerMinute quotas, so that G gateways do not give a tenant G times each. The counts are
// as fresh as the last report (REPORT_MS). Freshness is the reader's: a report counts for
// STALE_MS after this gateway received it (a reporter refreshes what it holds every
// STALE_MS / 2), so neither a gateway gone without closing nor a clock set wrong on another
// machine keeps a tenant's usage counted; the server drops a record TTL_MS after its last put.
import { createHash } from 'node:crypto';
import { nuid } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { WINDOW_MS } from '../quotas.ts';
import type { QuotaLedger, QuotaPeers } from '../quotas.ts';
import { JetStreamBucket } from './jetstream-bucket.ts';
import type { JetStreamStateOptions } from './jetstream-bucket.ts';

export const QUOTA_USAGE_BUCKET = 'tandem-quota-usage';

/** How often a gateway reports what changed. */
export const REPORT_MS = 250;

/** A report received longer ago than this is a gateway gone: it no longer counts. */
export const STALE_MS = 5_000;

/** The bucket drops a record this long after its last put (set when the bucket is created). */
const TTL_MS = 30_000;

/** How long close waits for a report in flight and for JetStream to take the deletes. */
const CLOSE_WAIT_MS = 1_000;

/** Puts of one report in flight at once. */
const PUTS_AT_ONCE = 64;

interface UsageRecord {
  gateway: string;
  tenant: string;
  tokens: number;
  /** Bytes of the reporter's current minute, and how much of the minute was left when it reported. */
  windowBytes: number;
  windowLeftMs: number;
}

function isUsageRecord(v: unknown): v is UsageRecord {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  const count = (x: unknown): boolean => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  return typeof r.gateway === 'string' && r.gateway.length <= 64 && typeof r.tenant === 'string' && r.tenant.length <= 256
    && count(r.tokens) && count(r.windowBytes) && count(r.windowLeftMs) && (r.windowLeftMs as number) <= WINDOW_MS; // a report saying more than a minute is left is refused
}

const keyOf = (gateway: string, tenant: string): string => `${gateway}-${createHash('sha256').update(tenant).digest('hex').slice(0, 32)}`;

/** A report as this gateway holds it: when it arrived here, by this gateway's clock. */
interface Received {
  record: UsageRecord;
  receivedAt: number;
}

export interface QuotaUsageOptions extends JetStreamStateOptions {
  /** Report interval (REPORT_MS). */
  reportMs?: number;
}

export class JetStreamQuotaUsage implements QuotaPeers {
  /** This gateway's id in the bucket (a fresh one each start). */
  readonly gateway: string;
  readonly #bucket: JetStreamBucket<UsageRecord>;
  /** The other gateways' reports by tenant, then key: what a check reads (every data-plane message makes one). */
  readonly #byTenant: Map<string, Map<string, Received>>;
  readonly #ledger: QuotaLedger;
  /** What this gateway last reported, by tenant, and when (ms). */
  readonly #reported = new Map<string, { shown: string; at: number }>();
  readonly #timer: NodeJS.Timeout;
  #reporting: Promise<void> | undefined;
  #closed = false;

  private constructor(gateway: string, bucket: JetStreamBucket<UsageRecord>, byTenant: Map<string, Map<string, Received>>, ledger: QuotaLedger, reportMs: number) {
    this.gateway = gateway;
    this.#bucket = bucket;
    this.#byTenant = byTenant;
    this.#ledger = ledger;
    this.#timer = setInterval(() => void this.report(), reportMs);
    this.#timer.unref();
  }

  /** Opens the bucket and counts the other gateways' reports in `ledger` from now on. */
  static async open(nc: NatsConnection, ledger: QuotaLedger, options: QuotaUsageOptions = {}): Promise<JetStreamQuotaUsage> {
    const byTenant = new Map<string, Map<string, Received>>();
    const self = nuid.next();
    const bucket = await JetStreamBucket.open<UsageRecord>(nc, QUOTA_USAGE_BUCKET, {
      replicas: options.replicas,
      markerGraceMs: options.markerGraceMs,
      ttlMs: TTL_MS,
      parse: (value, key) => (isUsageRecord(value) && keyOf(value.gateway, value.tenant) === key ? value : undefined),
      onInvalid: options.onInvalid,
      onWatch: (state, reason) => options.onWatch?.(QUOTA_USAGE_BUCKET, state, reason),
      onChange: (key, before, after) => {
        if (before !== undefined) {
          const reports = byTenant.get(before.tenant);
          reports?.delete(key);
          if (reports?.size === 0) byTenant.delete(before.tenant);
        }
        if (after === undefined || after.gateway === self) return;
        let reports = byTenant.get(after.tenant);
        if (reports === undefined) byTenant.set(after.tenant, (reports = new Map()));
        reports.set(key, { record: { ...after }, receivedAt: Date.now() });
      },
    });
    const usage = new JetStreamQuotaUsage(self, bucket, byTenant, ledger, options.reportMs ?? REPORT_MS);
    ledger.sharedWith(usage);
    void nc.closed().then(() => usage.close());
    return usage;
  }

  /** The other gateways' fresh reports of `tenant`, summed (stale ones are forgotten). */
  usage(tenant: string, now = Date.now()): { tokens: number; windowBytes: number; windowsEndAt: number } {
    let tokens = 0;
    let windowBytes = 0;
    let windowsEndAt = Infinity;
    const reports = this.#byTenant.get(tenant);
    for (const [key, { record, receivedAt }] of reports ?? []) {
      const age = now - receivedAt;
      if (age > STALE_MS) {
        if (age > TTL_MS) {
          reports!.delete(key);
          if (reports!.size === 0) this.#byTenant.delete(tenant);
        }
        continue;
      }
      tokens += record.tokens;
      if (age < record.windowLeftMs && record.windowBytes > 0) {
        windowBytes += record.windowBytes;
        windowsEndAt = Math.min(windowsEndAt, receivedAt + record.windowLeftMs);
      }
    }
    return { tokens, windowBytes, windowsEndAt };
  }

  /**
   * Reports what changed since the last report (a tenant back to nothing: its entry is deleted),
   * and again what is held STALE_MS / 2 after it was last reported. A report due while one still
   * runs is that one (the tick is skipped, not queued).
   */
  report(now = Date.now()): Promise<void> {
    this.#reporting ??= this.#report(now).finally(() => { this.#reporting = undefined; });
    return this.#reporting;
  }

  async #report(now: number): Promise<void> {
    const writes: Array<() => Promise<void>> = [];
    for (const [tenant, u] of this.#ledger.shared(now)) {
      const idle = u.tokens === 0 && u.windowBytes === 0;
      const last = this.#reported.get(tenant);
      if (idle) {
        if (last === undefined) continue; // nothing reported, nothing to delete
        writes.push(async () => {
          await this.#bucket.delete(keyOf(this.gateway, tenant));
          this.#reported.delete(tenant);
        });
        continue;
      }
      const shown = `${u.tokens}/${u.windowBytes}/${u.windowEndsAt}`;
      if (last?.shown === shown && now - last.at < STALE_MS / 2) continue;
      const record: UsageRecord = { gateway: this.gateway, tenant, tokens: u.tokens, windowBytes: u.windowBytes, windowLeftMs: Math.max(0, Math.min(WINDOW_MS, u.windowEndsAt - now)) };
      writes.push(async () => {
        await this.#bucket.put(keyOf(this.gateway, tenant), record);
        this.#reported.set(tenant, { shown, at: now });
      });
    }
    for (let i = 0; i < writes.length && !this.#closed; i += PUTS_AT_ONCE) {
      // JetStream unavailable for now: what failed is written by a later report.
      await Promise.all(writes.slice(i, i + PUTS_AT_ONCE).map((w) => (this.#closed ? undefined : w().catch(() => undefined))));
    }
  }

  /**
   * Stops reporting, waits (at most CLOSE_WAIT_MS in all) for a report in flight, and deletes
   * this gateway's reports; what JetStream does not take in time goes stale, then out with the TTL.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise((resolve) => { timer = setTimeout(resolve, CLOSE_WAIT_MS); });
    await Promise.race([this.#reporting, waited]);
    const deletes = [...this.#reported.keys()].map((tenant) => this.#bucket.delete(keyOf(this.gateway, tenant)).catch(() => undefined));
    await Promise.race([Promise.all(deletes), waited]);
    clearTimeout(timer);
    this.#bucket.close();
  }
}
