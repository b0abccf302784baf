// Who may touch a session, whichever store holds it: its tenant or the admin. Another
// tenant's session is reported exactly like a missing one (TANDEM_SESSION_UNKNOWN), so its
// existence does not leak.
import { CloudError } from '../errors.ts';

interface Owned {
  tenant: string;
  state: string;
}

export function visibleTo(caller: { admin: boolean; tenant: string }, s: Owned): boolean {
  return caller.admin || s.tenant === caller.tenant;
}

/** `s` if the caller may touch it (and, with `open`, it is open). */
export function sessionFor<S extends Owned>(caller: { admin: boolean; tenant: string }, id: string, s: S | undefined, open = false): S {
  if (s === undefined || !visibleTo(caller, s)) throw new CloudError('TANDEM_SESSION_UNKNOWN', { session: id });
  if (open && s.state !== 'open') throw new CloudError('TANDEM_SESSION_CLOSED', { session: id });
  return s;
}

/** Open sessions per tenant (the openSessions quota), kept beside a store's records. */
export class OpenSessionCounts {
  readonly #byTenant = new Map<string, number>();

  add(tenant: string, delta: number): void {
    const n = (this.#byTenant.get(tenant) ?? 0) + delta;
    if (n <= 0) this.#byTenant.delete(tenant);
    else this.#byTenant.set(tenant, n);
  }

  get total(): number {
    let n = 0;
    for (const count of this.#byTenant.values()) n += count;
    return n;
  }

  of(tenant: string): number {
    return this.#byTenant.get(tenant) ?? 0;
  }
}
