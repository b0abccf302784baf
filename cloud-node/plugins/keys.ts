// API keys: the admin creates one per data owner (tenant). The key is shown once.
import type { FastifyInstance } from 'fastify';
import type { CloudContext } from '../context.ts';
import { requireAdmin, requireCaller } from './auth.ts';
import { authErrors, security } from './schemas.ts';

export async function keysPlugin(app: FastifyInstance, ctx: CloudContext): Promise<void> {
  app.addHook('onRequest', requireCaller(ctx.keys));

  app.post<{ Body: { tenant: string } }>('/keys', {
    schema: {
      summary: 'create an API key for a tenant (admin key only); the key is returned once and stored hashed',
      tags: ['keys'], security,
      body: { type: 'object', required: ['tenant'], additionalProperties: false, properties: { tenant: { type: 'string' } } },
      response: {
        201: {
          type: 'object', required: ['tenant', 'key', 'id'],
          properties: { tenant: { type: 'string' }, key: { type: 'string' }, id: { type: 'string' }, createdAt: { type: 'string' } },
        },
        ...authErrors,
      },
    },
  }, async (request, reply) => {
    requireAdmin(request, 'creating keys');
    const { record, key } = await ctx.keys.create(request.body.tenant);
    return reply.code(201).send({ tenant: record.tenant, key, id: record.id, createdAt: record.createdAt });
  });
}
