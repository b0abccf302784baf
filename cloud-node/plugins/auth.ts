// API-key authentication for REST routes: `authorization: Bearer <key>`. One plugin,
// registered once around the authenticated scope: its onRequest hook decorates every request
// of that scope with `request.caller` before any route (or the rate limit) sees it.
import type { FastifyInstance, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { CloudError } from '../errors.ts';
import type { KeyRecords } from '../state/key-records.ts';
import type { Caller } from '../state/key-store.ts';

declare module 'fastify' {
  interface FastifyRequest {
    /** Who sent the request; set by the auth plugin on every route of the authenticated scope. */
    caller: Caller;
  }
}

export interface AuthPluginOptions {
  keys: KeyRecords;
}

export function bearerKey(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (match === null) throw new CloudError('TANDEM_AUTH_KEY_INVALID');
  return match[1];
}

async function auth(app: FastifyInstance, options: AuthPluginOptions): Promise<void> {
  app.decorateRequest('caller', null as unknown as Caller);
  app.addHook('onRequest', async (request) => {
    request.caller = await options.keys.authenticate(bearerKey(request.headers.authorization));
  });
}

/** Not encapsulated (fastify-plugin): the hook and the decoration apply to the scope that registers it. */
export const authPlugin = fp(auth, { name: 'tandem-auth', fastify: '5.x' });

export function requireAdmin(request: FastifyRequest, action: string): Caller {
  if (!request.caller.admin) throw new CloudError('TANDEM_AUTH_ADMIN_REQUIRED', { action });
  return request.caller;
}
