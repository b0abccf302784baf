// Sessions of the caller's tenant (all of them for the admin): list, inspect, close.
// Another tenant's session answers 404 TANDEM_SESSION_UNKNOWN, exactly like a missing one.
import type { FastifyInstance } from 'fastify';
import type { SessionService } from '../session-service.ts';
import type { SessionRecords } from '../state/session-records.ts';
import type { SessionRecord } from '../state/session-store.ts';
import { authErrors, security, sessionSchema } from './schemas.ts';

export interface SessionsPluginOptions {
  sessions: SessionRecords;
  service: SessionService;
}

function view(s: SessionRecord) {
  return { ...s, version: `${s.version.major}.${s.version.minor}` };
}

const idParams = { type: 'object', required: ['id'], properties: { id: { type: 'string' } } } as const;

export async function sessionsPlugin(app: FastifyInstance, ctx: SessionsPluginOptions): Promise<void> {
  app.get('/sessions', {
    schema: {
      summary: "the caller's sessions (the admin sees every tenant's)", tags: ['sessions'], security,
      response: { 200: { type: 'object', required: ['sessions'], properties: { sessions: { type: 'array', items: sessionSchema } } }, ...authErrors },
    },
  }, async (request) => ({ sessions: ctx.sessions.list(request.caller).map(view) }));

  app.get<{ Params: { id: string } }>('/sessions/:id', {
    schema: { summary: 'one session', tags: ['sessions'], security, params: idParams, response: { 200: sessionSchema, ...authErrors } },
  }, async (request) => view(ctx.sessions.get(request.caller, request.params.id)));

  app.delete<{ Params: { id: string } }>('/sessions/:id', {
    schema: {
      summary: 'close a session: its activations and cached replies are dropped; closing twice is a no-op',
      tags: ['sessions'], security, params: idParams, response: { 200: sessionSchema, ...authErrors },
    },
  }, async (request) => {
    const { caller } = request;
    // The record as this request closed it: a sweep may prune a closed session at any time after.
    const session = ctx.sessions.get(caller, request.params.id);
    await ctx.service.close(caller, request.params.id, { reason: 'cancelled', message: 'closed through the REST API' });
    return view(session);
  });
}
