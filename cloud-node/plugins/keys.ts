// API keys: the admin creates one per data owner (tenant), lists them (prefixes only) and
// revokes them. A key is shown once, at creation.
import type { FastifyInstance } from 'fastify';
import type { KeyRecords } from '../state/key-records.ts';
import { requireAdmin } from './auth.ts';
import { authErrors, security } from './schemas.ts';

export interface KeysPluginOptions {
  keys: KeyRecords;
}

const keyViewSchema = {
  type: 'object',
  required: ['id', 'tenant', 'admin', 'prefix', 'createdAt'],
  properties: {
    id: { type: 'string' },
    tenant: { type: 'string' },
    admin: { type: 'boolean' },
    prefix: { type: 'string', description: 'the first characters of the key (empty for keys made before prefixes were kept)' },
    createdAt: { type: 'string' },
    revokedAt: { type: 'string' },
  },
} as const;

export async function keysPlugin(app: FastifyInstance, ctx: KeysPluginOptions): Promise<void> {
  app.post<{ Body: { tenant: string } }>('/keys', {
    schema: {
      summary: 'create an API key for a tenant (admin key only); the key is returned once and stored hashed',
      tags: ['keys'], security,
      body: { type: 'object', required: ['tenant'], additionalProperties: false, properties: { tenant: { type: 'string', maxLength: 64 } } },
      response: {
        201: {
          type: 'object', required: ['tenant', 'key', 'id'],
          properties: { tenant: { type: 'string' }, key: { type: 'string' }, id: { type: 'string' }, prefix: { type: 'string' }, createdAt: { type: 'string' } },
        },
        ...authErrors,
      },
    },
  }, async (request, reply) => {
    requireAdmin(request, 'creating keys');
    const { record, key } = await ctx.keys.create(request.body.tenant);
    return reply.code(201).send({ tenant: record.tenant, key, id: record.id, prefix: record.prefix, createdAt: record.createdAt });
  });

  app.get('/keys', {
    schema: {
      summary: 'every API key (admin key only): id, tenant, prefix, dates; never the key or its hash',
      tags: ['keys'], security,
      response: { 200: { type: 'object', required: ['keys'], properties: { keys: { type: 'array', items: keyViewSchema } } }, ...authErrors },
    },
  }, async (request) => {
    requireAdmin(request, 'listing keys');
    return { keys: await ctx.keys.list() };
  });

  app.delete<{ Params: { id: string } }>('/keys/:id', {
    schema: {
      summary: 'revoke an API key (admin key only): it fails from the next request on, and its open sockets are disconnected with TANDEM_AUTH_KEY_REVOKED',
      tags: ['keys'], security,
      params: { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 64 } } },
      response: { 200: keyViewSchema, ...authErrors },
    },
  }, async (request) => {
    requireAdmin(request, 'revoking keys');
    return ctx.keys.revoke(request.params.id);
  });
}
