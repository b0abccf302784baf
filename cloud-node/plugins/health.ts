// Liveness and readiness, without authentication.
import type { FastifyInstance } from 'fastify';
import type { ModelSlot } from '../context.ts';

export interface HealthPluginOptions {
  model: ModelSlot;
}

export async function healthPlugin(app: FastifyInstance, ctx: HealthPluginOptions): Promise<void> {
  app.get('/health', {
    schema: {
      summary: 'liveness: the process answers',
      tags: ['operations'],
      response: { 200: { type: 'object', required: ['status'], properties: { status: { type: 'string', enum: ['ok'] } } } },
    },
  }, async () => ({ status: 'ok' as const }));

  const readySchema = { type: 'object', required: ['status'], properties: { status: { type: 'string', enum: ['ready', 'loading'] } } } as const;
  app.get('/ready', {
    schema: { summary: 'readiness: 200 once the model is loaded, 503 before', tags: ['operations'], response: { 200: readySchema, 503: readySchema } },
  }, async (_request, reply) => {
    if (!ctx.model.ready) return reply.code(503).send({ status: 'loading' });
    return { status: 'ready' as const };
  });
}
