// /dashboard: the operator's page. The page and its assets carry no data and need no key; the
// data comes from the /v1 routes, behind the key, which the page asks for, keeps in the tab's
// sessionStorage and sends as `Authorization: Bearer` (a key in a URL would be logged, and a
// cookie would make every /v1 route answer cross-site requests). Strict CSP: scripts, styles
// and connections from this origin only, no inline script or style, no framing.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import type { FastifyInstance, FastifyReply } from 'fastify';

export const DASHBOARD_CSP = [
  "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
  "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
].join('; ');

const ASSETS_DIR = join(import.meta.dirname, '..', 'dashboard');

/** The chart library's browser build, wherever the package is installed. */
function chartJsPath(): string {
  return join(dirname(createRequire(import.meta.url).resolve('chart.js')), 'chart.umd.js');
}

interface Asset {
  type: string;
  body: Buffer;
}

export async function dashboardPlugin(app: FastifyInstance): Promise<void> {
  // Read once at start: a missing asset stops the start, not a page view.
  const assets: Record<string, Asset> = {
    'dashboard.js': { type: 'text/javascript; charset=utf-8', body: readFileSync(join(ASSETS_DIR, 'dashboard.js')) },
    'dashboard.css': { type: 'text/css; charset=utf-8', body: readFileSync(join(ASSETS_DIR, 'dashboard.css')) },
    // Without its source-map comment: the map is not served.
    'chart.umd.js': { type: 'text/javascript; charset=utf-8', body: Buffer.from(readFileSync(chartJsPath(), 'utf8').replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n')) },
  };
  const page = readFileSync(join(ASSETS_DIR, 'index.html'));

  app.addHook('onSend', async (_request, reply) => {
    reply.header('content-security-policy', DASHBOARD_CSP);
    reply.header('x-content-type-options', 'nosniff');
    reply.header('referrer-policy', 'no-referrer');
    reply.header('x-frame-options', 'DENY');
    reply.header('cross-origin-opener-policy', 'same-origin');
    reply.header('cross-origin-resource-policy', 'same-origin');
  });

  const sendPage = async (_request: unknown, reply: FastifyReply) => reply.type('text/html; charset=utf-8').header('cache-control', 'no-store').send(page);
  const hidden = { schema: { hide: true } };
  app.get('/dashboard', hidden, sendPage);
  app.get('/dashboard/', hidden, sendPage);
  app.get<{ Params: { name: string } }>('/dashboard/:name', {
    schema: { hide: true, params: { type: 'object', required: ['name'], properties: { name: { type: 'string', maxLength: 64 } } } },
  }, async (request, reply) => {
    const asset = Object.hasOwn(assets, request.params.name) ? assets[request.params.name] : undefined;
    if (asset === undefined) return reply.callNotFound();
    return reply.type(asset.type).header('cache-control', 'no-cache').send(asset.body);
  });
}
