// The adapters a tenant serves: upload a PEFT folder's two files, list, delete. An upload is
// multipart/form-data (the files as they are; any size the quota allows) or JSON with the
// weights in base64 (at most MAX_JSON_ADAPTER_BODY_BYTES: its parse costs the node's thread).
import multipart from '@fastify/multipart';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { CloudError } from '../errors.ts';
import type { QuotaLedger, TenantQuotas } from '../quotas.ts';
import type { ServedModel } from '../served-model.ts';
import { checkAdapterName, checkUploadBase } from '../serving/adapter-registry.ts';
import type { ServedAdapterRecord } from '../serving/adapter-registry.ts';
import type { Serving } from '../serving/serving.ts';
import { MAX_FORM_FIELD_BYTES, MAX_JSON_ADAPTER_BODY_BYTES, MULTIPART_OPTIONS, booleanField, jsonBodyOf, readAdapterForm, requiredField } from './adapter-form.ts';
import { authErrors, security } from './schemas.ts';

export interface AdaptersPluginOptions {
  serving: Serving;
  quotas: QuotaLedger;
  /** A form that sends nothing for this long is dropped (FORM_IDLE_TIMEOUT_MS). */
  formIdleTimeoutMs?: number;
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

const uploadBodySchema = {
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
} as const;

const uploadFormSchema = {
  // The parts are read and checked by the route (adapter-form.ts), not by a schema.
  description: 'parts: name, baseContentHash, shared ("true"/"false", optional), config (adapter_config.json, a file or a field), weights (adapter_model.safetensors, a file)',
} as const;

function checkedField(value: string, field: string, limit: number): string {
  if (value.length > limit) throw new CloudError('TANDEM_FIELD_TOO_LONG', { field, actual: value.length, limit });
  return value;
}

export async function adaptersPlugin(app: FastifyInstance, ctx: AdaptersPluginOptions): Promise<void> {
  await app.register(multipart, MULTIPART_OPTIONS);
  const view = (ref: string, record: ServedAdapterRecord) => ({ ...record, model: `${ctx.serving.runtime().served.id}:${ref}` });

  app.post<{ Body: UploadBody | undefined }>('/adapters', {
    // A JSON body is bounded before it is read; the weights' decoded size is checked against the quota before decoding.
    bodyLimit: Math.min(MAX_JSON_ADAPTER_BODY_BYTES, ctx.serving.limits.maxUploadBytes),
    schema: {
      summary: 'upload a PEFT LoRA adapter to serve as "base:name": multipart/form-data with its two files, or JSON (adapter_config.json as text, adapter_model.safetensors as base64; at most 4 MiB)', tags: ['serving'], security,
      body: { content: { 'application/json': { schema: uploadBodySchema }, 'multipart/form-data': { schema: uploadFormSchema } } },
      response: { 201: adapterSchema, ...authErrors },
    },
  }, async (request, reply) => {
    const { served } = ctx.serving.runtime();
    const { tenant } = request.caller;
    const quotas = ctx.quotas.of(tenant);
    // Held before a form is read (and released with the reply): a tenant's uploads in flight
    // are bounded, each by the upload limit, so its forms cannot make the node buffer without end.
    const release = ctx.quotas.holdAdapter(tenant);
    try {
      return await receive(request, reply, tenant, quotas, served);
    } finally {
      release();
    }
  });

  async function receive(request: FastifyRequest<{ Body: UploadBody | undefined }>, reply: FastifyReply, tenant: string, quotas: TenantQuotas, served: ServedModel): Promise<FastifyReply> {
    let upload: Parameters<typeof ctx.serving.registry.add>[1];
    if (request.isMultipart()) {
      // The weights are bounded by the tenant's quota and the node's upload limit as they stream in.
      const form = await readAdapterForm(request, {
        fields: ['name', 'baseContentHash', 'shared', 'config'],
        files: {
          weights: quotas.servedAdapterBytes < ctx.serving.limits.maxUploadBytes
            ? { bytes: quotas.servedAdapterBytes, refuse: (limit) => new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field: 'weights bytes', actual: `over ${limit}`, limit }) }
            : { bytes: ctx.serving.limits.maxUploadBytes },
          config: { bytes: MAX_FORM_FIELD_BYTES },
        },
        onField: (name, value) => {
          if (name === 'name') checkAdapterName(value);
          if (name === 'baseContentHash') checkUploadBase(value, served);
        },
        idleTimeoutMs: ctx.formIdleTimeoutMs,
      });
      const weights = form.files.get('weights');
      if (weights === undefined) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: 'the form has no "weights" part (adapter_model.safetensors)' });
      const config = form.files.get('config')?.toString('utf8') ?? requiredField(form, 'config');
      upload = {
        name: checkedField(requiredField(form, 'name'), 'name', 64), shared: booleanField(form, 'shared'),
        baseContentHash: checkedField(requiredField(form, 'baseContentHash'), 'baseContentHash', 80),
        config, weights: new Uint8Array(weights.buffer, weights.byteOffset, weights.byteLength),
      };
    } else {
      const body = jsonBodyOf<UploadBody>(request);
      const encoded = body.adapter.weights;
      const decodedBytes = Math.floor((encoded.length * 3) / 4);
      if (decodedBytes > quotas.servedAdapterBytes) throw new CloudError('TANDEM_ADAPTER_TOO_LARGE', { field: 'adapter.weights bytes', actual: decodedBytes, limit: quotas.servedAdapterBytes });
      if (!BASE64.test(encoded)) throw new CloudError('TANDEM_ADAPTER_INVALID', { model: served.id, reason: 'adapter.weights must be base64' });
      upload = { name: body.name, shared: body.shared, baseContentHash: body.baseContentHash, config: body.adapter.config, weights: new Uint8Array(Buffer.from(encoded, 'base64')) };
    }
    const record = await ctx.serving.registry.add(tenant, upload, served, quotas);
    return reply.code(201).send(view(record.name, record));
  }

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
