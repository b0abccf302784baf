// Per-tenant quotas: what one data owner may hold or spend at once, so that no tenant can
// crowd out the others. Over a quota: 429 / TANDEM_QUOTA_EXCEEDED naming the quota and
// its value, on REST and inside the socket's Error body alike.
import { CloudError } from './errors.ts';

export interface TenantQuotas {
  /** Sessions open at once. */
  openSessions: number;
  /** Tokens (batch x sequence) of Forwards and Backwards computing at once. */
  tokensInFlight: number;
  /** Bytes received on the data plane per minute (a fixed one-minute window). */
  bytesPerMinute: number;
  /** Emulator bundles the tenant's requests keep built in the state directory. */
  storedBundles: number;
  /** Adapters the node holds for the tenant at once (plug-in evaluations in progress). */
  storedAdapters: number;
  /** REST requests per minute (@fastify/rate-limit). */
  requestsPerMinute: number;
  /** Adapters the tenant keeps uploaded for serving (POST /v1/adapters). */
  servedAdapters: number;
  /** Bytes of adapter weights the tenant keeps uploaded for serving, all its adapters together. */
  servedAdapterBytes: number;
  /** Rank of a middle adapter the cloud holds for one of the tenant's sessions (protocol 1.3). */
  heldAdapterRank: number;
  /** Bytes of the middle adapters (weights and AdamW state) the cloud holds for the tenant, all its sessions together. */
  heldAdapterBytes: number;
  /** Data-plane sockets the tenant may have connected at once. */
  connections: number;
  /** Bytes the tenant's incomplete chunked requests may hold at once (its share of the node's reassembly budget). */
  reassemblyBytes: number;
  /**
   * Bytes of the gradient codec's error-feedback residuals the node keeps for the tenant, all its
   * sessions together. Not a refusal: past it the least recently used residual is given up, and
   * that stream's error feedback restarts.
   */
  feedbackBytes: number;
}

export type QuotaName = keyof TenantQuotas;

export const DEFAULT_QUOTAS: Readonly<TenantQuotas> = {
  openSessions: 32,
  tokensInFlight: 64 * 1024,
  bytesPerMinute: 4 * 1024 ** 3,
  storedBundles: 4,
  storedAdapters: 2,
  requestsPerMinute: 1200,
  servedAdapters: 16,
  servedAdapterBytes: 256 * 1024 * 1024,
  heldAdapterRank: 64,
  heldAdapterBytes: 256 * 1024 * 1024,
  connections: 64,
  reassemblyBytes: 128 * 1024 * 1024,
  feedbackBytes: 128 * 1024 * 1024,
};

/** A tenant's bytesPerMinute window (ms). */
export const WINDOW_MS = 60_000;

export function quotaExceeded(tenant: string, quota: QuotaName, limit: number, reason: string): CloudError {
  return new CloudError('TANDEM_QUOTA_EXCEEDED', { tenant, quota, limit, reason });
}

/** The defaults overridden by `partial`; every value must be a positive integer. */
export function resolveQuotas(partial: Partial<TenantQuotas> = {}, option = 'quotas'): TenantQuotas {
  const out: TenantQuotas = { ...DEFAULT_QUOTAS };
  for (const [name, value] of Object.entries(partial)) {
    if (!Object.hasOwn(DEFAULT_QUOTAS, name)) {
      throw new CloudError('TANDEM_OPTION_INVALID', { option: `${option}.${name}`, value: JSON.stringify(value), reason: `unknown quota; known: ${Object.keys(DEFAULT_QUOTAS).join(', ')}` });
    }
    if (value === undefined) continue;
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) {
      throw new CloudError('TANDEM_OPTION_INVALID', { option: `${option}.${name}`, value: JSON.stringify(value), reason: 'must be an integer >= 1' });
    }
    out[name as QuotaName] = value;
  }
  return out;
}

interface TenantUsage {
  tokens: number;
  adapters: number;
  windowStart: number;
  windowBytes: number;
}

/** What a tenant spends now on this process: what other gateways of a cluster add to their own. */
export interface SharedUsage {
  tokens: number;
  /** Bytes received in the current one-minute window, and when it ends (ms). */
  windowBytes: number;
  windowEndsAt: number;
}

/**
 * What the other gateways of a cluster report a tenant spends (a gateway's QuotaLedger alone
 * sees its own connections): tokens in flight and the bytes of their current minutes.
 */
export interface QuotaPeers {
  /** `windowsEndAt`: when the soonest of the counted minutes with bytes in it ends (ms; Infinity for none). */
  usage(tenant: string, now?: number): { tokens: number; windowBytes: number; windowsEndAt: number };
}

const NO_PEERS: QuotaPeers = { usage: () => ({ tokens: 0, windowBytes: 0, windowsEndAt: Infinity }) };

/** What each tenant holds and spends now, against its quotas. */
export class QuotaLedger {
  readonly defaults: TenantQuotas;
  readonly #overrides = new Map<string, TenantQuotas>();
  readonly #usage = new Map<string, TenantUsage>();
  #peers: QuotaPeers = NO_PEERS;

  constructor(defaults: Partial<TenantQuotas> = {}, perTenant: Readonly<Record<string, Partial<TenantQuotas>>> = {}) {
    this.defaults = resolveQuotas(defaults);
    for (const [tenant, partial] of Object.entries(perTenant)) this.#overrides.set(tenant, resolveQuotas({ ...this.defaults, ...partial }, `tenantQuotas.${tenant}`));
  }

  of(tenant: string): TenantQuotas {
    return this.#overrides.get(tenant) ?? this.defaults;
  }

  /** Counts what `peers` report against tokensInFlight and bytesPerMinute too (the gateways of a cluster). */
  sharedWith(peers: QuotaPeers): void {
    this.#peers = peers;
  }

  /**
   * Each tenant's tokens in flight and bytes of the current minute here (what a gateway reports to
   * the others). A tenant holding nothing, its minute over, is in it once more (all zero, so that
   * its report is withdrawn) and is then forgotten here.
   */
  shared(now = Date.now()): Map<string, SharedUsage> {
    const out = new Map<string, SharedUsage>();
    for (const [tenant, u] of this.#usage) {
      const windowEndsAt = u.windowStart + WINDOW_MS;
      const windowBytes = now < windowEndsAt ? u.windowBytes : 0;
      out.set(tenant, { tokens: u.tokens, windowBytes, windowEndsAt });
      if (u.tokens === 0 && u.adapters === 0 && windowBytes === 0) this.#usage.delete(tenant);
    }
    return out;
  }

  #usageOf(tenant: string): TenantUsage {
    let u = this.#usage.get(tenant);
    if (u === undefined) {
      u = { tokens: 0, adapters: 0, windowStart: 0, windowBytes: 0 };
      this.#usage.set(tenant, u);
    }
    return u;
  }

  /** Refuses a new session when the tenant already has `open` sessions open. */
  checkOpenSessions(tenant: string, open: number): void {
    const limit = this.of(tenant).openSessions;
    if (open >= limit) throw quotaExceeded(tenant, 'openSessions', limit, `${open} sessions are open; close one (SessionClose or DELETE /v1/sessions/:id)`);
  }

  /**
   * Reserves `tokens` for one computation (the executor calls this before it starts) and
   * returns the release, to call once it ends, whatever the outcome.
   */
  reserveTokens(tenant: string, tokens: number): () => void {
    const limit = this.of(tenant).tokensInFlight;
    const u = this.#usageOf(tenant);
    const elsewhere = this.#peers.usage(tenant).tokens;
    if (u.tokens + elsewhere + tokens > limit) {
      throw quotaExceeded(tenant, 'tokensInFlight', limit, `${u.tokens + elsewhere} tokens are computing${elsewhere > 0 ? ` (${elsewhere} through other gateways)` : ''} and this request adds ${tokens}`);
    }
    u.tokens += tokens;
    return once(() => { u.tokens -= tokens; });
  }

  /** Counts bytes received on the data plane; throws once the minute's allowance is spent. */
  chargeBytes(tenant: string, bytes: number, now = Date.now()): void {
    const limit = this.of(tenant).bytesPerMinute;
    const u = this.#usageOf(tenant);
    if (now - u.windowStart >= WINDOW_MS) {
      u.windowStart = now;
      u.windowBytes = 0;
    }
    const peers = this.#peers.usage(tenant, now);
    const elsewhere = peers.windowBytes;
    if (u.windowBytes + elsewhere + bytes > limit) {
      // Bytes come back when a minute that holds some ends: this gateway's, or another's.
      const frees = Math.min(u.windowBytes > 0 ? u.windowStart + WINDOW_MS : Infinity, peers.windowsEndAt);
      const retry = Number.isFinite(frees) ? Math.max(1, Math.ceil((frees - now) / 1000)) : Math.ceil(WINDOW_MS / 1000);
      throw quotaExceeded(tenant, 'bytesPerMinute', limit, `${u.windowBytes + elsewhere} bytes were received in this minute${elsewhere > 0 ? ` (${elsewhere} through other gateways)` : ''}; retry in ${retry} s`);
    }
    u.windowBytes += bytes;
  }

  /** Holds one adapter for the tenant; returns the release. */
  holdAdapter(tenant: string): () => void {
    const limit = this.of(tenant).storedAdapters;
    const u = this.#usageOf(tenant);
    if (u.adapters >= limit) throw quotaExceeded(tenant, 'storedAdapters', limit, `${u.adapters} adapters of this tenant are being evaluated or uploaded`);
    u.adapters += 1;
    return once(() => { u.adapters -= 1; });
  }
}

/** Refuses an upload that would take the tenant over its served-adapter count or bytes. */
export function checkServedAdapters(quotas: TenantQuotas, tenant: string, held: { count: number; bytes: number }, adding: number): void {
  if (held.count + 1 > quotas.servedAdapters) throw quotaExceeded(tenant, 'servedAdapters', quotas.servedAdapters, `${held.count} adapters are uploaded; delete one (DELETE /v1/adapters/:name)`);
  if (held.bytes + adding > quotas.servedAdapterBytes) throw quotaExceeded(tenant, 'servedAdapterBytes', quotas.servedAdapterBytes, `${held.bytes} bytes are uploaded and this adapter adds ${adding}`);
}

function once(f: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    f();
  };
}
