// Prometheus text at /metrics. Unauthenticated, as scrapers expect: it carries counts by
// codec, kind and error code, never a tenant, session or key.
import type { FastifyInstance } from 'fastify';
import type { CloudMetrics } from '../metrics.ts';

export interface MetricsPluginOptions {
  metrics: CloudMetrics;
}

export async function metricsPlugin(app: FastifyInstance, ctx: MetricsPluginOptions): Promise<void> {
  app.get('/metrics', {
    schema: { summary: 'Prometheus metrics', tags: ['operations'], response: { 200: { type: 'string' } } },
  }, async (_request, reply) => {
    const text = await ctx.metrics.registry.metrics();
    return reply.type(ctx.metrics.registry.contentType).send(text);
  });
}
