// API-key authentication for REST routes: `authorization: Bearer <key>`. A plugin adds
// `requireCaller(keys)` as an onRequest hook in its own scope and reads the caller back
// with `callerOf(request)`.
import type { FastifyRequest, onRequestAsyncHookHandler } from 'fastify';
import { CloudError } from '../errors.ts';
import type { Caller, KeyStore } from '../state/key-store.ts';

const callers = new WeakMap<FastifyRequest, Caller>();

export function bearerKey(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (match === null) throw new CloudError('TANDEM_AUTH_KEY_INVALID');
  return match[1];
}

export function requireCaller(keys: KeyStore): onRequestAsyncHookHandler {
  return async (request) => {
    callers.set(request, await keys.authenticate(bearerKey(request.headers.authorization)));
  };
}

export function callerOf(request: FastifyRequest): Caller {
  const caller = callers.get(request);
  if (caller === undefined) throw new CloudError('TANDEM_AUTH_KEY_MISSING');
  return caller;
}

export function requireAdmin(request: FastifyRequest, action: string): Caller {
  const caller = callerOf(request);
  if (!caller.admin) throw new CloudError('TANDEM_AUTH_ADMIN_REQUIRED', { action });
  return caller;
}
