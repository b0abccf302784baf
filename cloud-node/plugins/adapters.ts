// The adapters a tenant serves: upload a PEFT folder's two files, list, delete.
import type { FastifyInstance } from 'fastify';
import { CloudError } from '../errors.ts';
import type { QuotaLedger } from '../quotas.ts';
import type { ServedAdapterRecord } from '../serving/adapter-registry.ts';
import type { Serving } from '../serving/serving.ts';
import { authErrors, security } from './schemas.ts';

export interface AdaptersPluginOptions {
  serving: Serving;
  quotas: QuotaLedger;
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

const adapterSchema = {
  type: 'object',
  required: ['name', 'model', 'tenant', 'shared', 'peftType', 'bytes', 'sha256', 'baseContentHash', 'createdAt'],
  properties: {
    name: { type: 'string' },
    model: { type: 'string', description: 'the name to use in /v1/completions: "base:adapter" (or "base:owner/adapter" for another tenant\'s shared one)' },
    tenant: { type: 'string' },
    shared: { type: 'boolean', description: 'every tenant may use it; otherwise only its own' },
    peftType: { type: 'string' },
    bytes: { type: 'integer', description: 'bytes of adapter_model.safetensors' },
    sha256: { type: 'string' },
    baseContentHash: { type: 'string' },
    createdAt: { type: 'string' },
  },
} as const;

interface UploadBody {
  name: string;
  shared?: boolean;
  baseContentHash: string;
  adapter: { config: string; weights: string };
}

export async function adaptersPlugin(app: FastifyInstance, ctx: AdaptersPluginOptions): Promise<void> {
  const view = (ref: string, record: ServedAdapterRecord) => ({ ...record, model: `${ctx.serving.runtime().served.id}:${ref}` });

  app.post<{ Body: UploadBody }>('/adapters', {
    // The body is bounded before it is read; the weights' decoded size is checked against the quota before decoding.
    bodyLimit: ctx.serving.limits.maxUploadBytes,
    schema: {
      summary: 'upload a PEFT LoRA adapter (adapter_config.json as text, adapter_model.safetensors as base64) to serve as "base:name"', tags: ['serving'], security,
      body: {
        type: 'object',
        required: ['name', 'baseContentHash', 'adapter'],
        additionalProperties: false,
        properties: {
          name: { type: 'string', maxLength: 64 },
          shared: { type: 'boolean' },
          baseContentHash: { type: 'string', maxLength: 80, description: 'content hash of the model it was trained against (GET /v1/models contentHash)' },
          adapter: {
            type: 'object', required: ['config', 'weights'], additionalProperties: false,
            properties: { config: { type: 'string', description: 'adapter_config.json as text' }, weights: { type: 'string', description: 'adapter_model.safetensors, base64' } },
          },
        },
      },
      response: { 201: adapterSchema, ...authErrors },
    },
  }, async (request, reply) => {
    const { served } = ctx.serving.runtime();
    const { tenant } = request.caller;
    const quotas = ctx.quotas.of(tenant);
    const encoded = request.body.adapter.weights;
    const decodedBytes = Math.floor((encoded.length * 3) / 4);
    if (decodedBytes > quotas.servedAdapterBytes) throw new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field: 'adapter.weights bytes', actual: decodedBytes, limit: quotas.servedAdapterBytes });
    if (!BASE64.test(encoded)) throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: 'adapter.weights must be base64' });
    const record = await ctx.serving.registry.add(tenant, {
      name: request.body.name, shared: request.body.shared, baseContentHash: request.body.baseContentHash,
      config: request.body.adapter.config, weights: new Uint8Array(Buffer.from(encoded, 'base64')),
    }, served, quotas);
    return reply.code(201).send(view(record.name, record));
  });

  app.get('/adapters', {
    schema: {
      summary: 'the adapters this key may serve: its own, then those other tenants share', tags: ['serving'], security,
      response: { 200: { type: 'object', required: ['adapters'], properties: { adapters: { type: 'array', items: adapterSchema } } }, ...authErrors },
    },
  }, async (request) => ({ adapters: ctx.serving.registry.visibleTo(request.caller.tenant).map(({ ref, record }) => view(ref, record)) }));

  app.delete<{ Params: { name: string } }>('/adapters/:name', {
    schema: {
      summary: 'delete one of this tenant\'s adapters; requests already generating with it finish', tags: ['serving'], security,
      params: { type: 'object', required: ['name'], properties: { name: { type: 'string', maxLength: 64 } } },
      response: { 200: adapterSchema, ...authErrors },
    },
  }, async (request) => {
    ctx.serving.runtime();
    const record = await ctx.serving.registry.remove(request.caller.tenant, request.params.name);
    return view(record.name, record);
  });
}
