// Offsite mode on the node: emulator bundles of the served model for download, and the
// evaluation of adapters trained against them, plugged into the full model.
import multipart from '@fastify/multipart';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { QUANTIZATIONS, checkAdapterBase } from '../../emulator/index.ts';
import type { Quantization } from '../../emulator/index.ts';
import type { AdapterFiles, EvaluationData } from '../adapter-evaluation.ts';
import type { AdapterEvaluator } from '../adapter-evaluator.ts';
import type { ModelSlot } from '../context.ts';
import type { EmulatorRegistry, EmulatorRequest } from '../emulator-registry.ts';
import { CloudError } from '../errors.ts';
import type { QuotaLedger } from '../quotas.ts';
import type { ServedModel } from '../served-model.ts';
import { MAX_FORM_FIELD_BYTES, MAX_JSON_ADAPTER_BODY_BYTES, MULTIPART_OPTIONS, integerField, jsonBodyOf, readAdapterForm, requiredField } from './adapter-form.ts';
import { sendListedFile } from './files.ts';
import { authErrors, cutSchema, errorSchema, security } from './schemas.ts';

/** Defaults of the adapter evaluation limits. */
export const DEFAULT_ADAPTER_REQUEST_BYTES = 64 * 1024 * 1024;
export const DEFAULT_EVAL_TEXT_BYTES = 8 * 1024 * 1024;
const MAX_EVAL_BATCH = 64;

export interface EmulatorsPluginOptions {
  model: ModelSlot;
  emulators: EmulatorRegistry;
  quotas: QuotaLedger;
  /** Runs POST /adapters/evaluate in its worker thread. */
  evaluator: AdapterEvaluator;
  /** Largest POST /adapters/evaluate body, base64 adapter and data included. */
  maxAdapterRequestBytes?: number;
  /** Largest evaluation text, in UTF-8 bytes. */
  maxEvalTextBytes?: number;
  /** A form that sends nothing for this long is dropped (FORM_IDLE_TIMEOUT_MS). */
  formIdleTimeoutMs?: number;
}

const emulatorQuery = {
  type: 'object',
  required: ['keep'],
  properties: {
    keep: { type: 'integer', minimum: 1, description: 'middle blocks the emulator keeps (uniform layer drop; first and last always)' },
    bottom: { type: 'integer', minimum: 0 },
    top: { type: 'integer', minimum: 0 },
    quantize: { type: 'string', enum: [...QUANTIZATIONS] },
  },
} as const;

interface EmulatorQuery {
  keep: number;
  bottom?: number;
  top?: number;
  quantize?: Quantization;
}

const fileSchema = { type: 'object', required: ['name', 'bytes', 'sha256'], properties: { name: { type: 'string' }, bytes: { type: 'integer' }, sha256: { type: 'string' } } } as const;
const evaluateBodySchema = {
  type: 'object',
  required: ['baseContentHash', 'adapter', 'data'],
  additionalProperties: false,
  properties: {
    baseContentHash: { type: 'string', description: 'content hash of the model the adapter was trained against (tandem_offsite.json), with or without "sha256:"' },
    adapter: {
      type: 'object', required: ['config', 'weights'], additionalProperties: false,
      properties: { config: { type: 'string', description: 'adapter_config.json as text' }, weights: { type: 'string', description: 'adapter_model.safetensors, base64' } },
    },
    data: {
      type: 'object', required: ['name', 'text'], additionalProperties: false,
      properties: { name: { type: 'string', description: 'file name: .jsonl by record ({"text"}, {"prompt","completion"}, {"text","label"}), else plain text' }, text: { type: 'string' } },
    },
    seqLen: { type: 'integer', minimum: 2 },
    batchSize: { type: 'integer', minimum: 1, maximum: MAX_EVAL_BATCH },
  },
} as const;

const evaluateFormSchema = {
  // The parts are read and checked by the route (adapter-form.ts), not by a schema.
  description: 'parts: baseContentHash; config (adapter_config.json, a file or a field); weights (adapter_model.safetensors); data (the text or .jsonl, a file: its file name or a dataName field says which); seqLen, batchSize (optional)',
} as const;

const figuresSchema = { type: 'object', required: ['loss', 'perplexity', 'tokens'], properties: { loss: { type: 'number' }, perplexity: { type: 'number' }, tokens: { type: 'integer' }, accuracy: { type: 'number' } } } as const;

interface EvaluateBody {
  baseContentHash: string;
  adapter: { config: string; weights: string };
  data: { name: string; text: string };
  seqLen?: number;
  batchSize?: number;
}

function requestOf(served: ServedModel, q: EmulatorQuery): EmulatorRequest {
  const fallback = served.defaultCut;
  return { keep: q.keep, bottom: q.bottom ?? fallback.bottom, top: q.top ?? fallback.top, quantize: q.quantize ?? null };
}

export async function emulatorsPlugin(app: FastifyInstance, options: EmulatorsPluginOptions): Promise<void> {
  const ctx = options;
  const maxBody = options.maxAdapterRequestBytes ?? DEFAULT_ADAPTER_REQUEST_BYTES;
  const maxText = options.maxEvalTextBytes ?? DEFAULT_EVAL_TEXT_BYTES;
  await app.register(multipart, MULTIPART_OPTIONS);
  app.get<{ Params: { id: string }; Querystring: EmulatorQuery }>('/models/:id/emulators', {
    schema: {
      summary: 'manifest of an emulator bundle (bottom and top blocks, the emulator of the middle, tokenizer) for offsite training; built on the first request and kept',
      tags: ['emulators'], security,
      params: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } },
      querystring: emulatorQuery,
      response: {
        200: {
          type: 'object',
          required: ['model', 'contentHash', 'cut', 'keptLayers', 'manifest', 'files'],
          properties: {
            model: { type: 'string' },
            contentHash: { type: 'string' },
            cut: cutSchema,
            keptLayers: { type: 'array', items: { type: 'integer' } },
            manifest: { type: 'object', additionalProperties: true, description: 'manifest.json of the bundle (emulator/README.md)' },
            files: { type: 'array', items: fileSchema, description: 'every file of the bundle, manifest.json included' },
          },
        },
        ...authErrors,
      },
    },
  }, async (request) => {
    const served = ctx.model.byId(request.params.id);
    const bundle = await options.emulators.get(served, requestOf(served, request.query), request.caller.tenant);
    return { model: served.id, contentHash: served.contentHash, cut: bundle.manifest.cut, keptLayers: bundle.manifest.keptLayers, manifest: bundle.manifest, files: bundle.files };
  });

  app.get<{ Params: { id: string; name: string }; Querystring: EmulatorQuery }>('/models/:id/emulators/files/:name', {
    schema: {
      summary: 'one file of an emulator bundle; its sha256 is in the manifest and in the x-tandem-sha256 header',
      tags: ['emulators'], security,
      params: { type: 'object', required: ['id', 'name'], properties: { id: { type: 'string' }, name: { type: 'string' } } },
      querystring: emulatorQuery,
      response: { 200: { type: 'string', format: 'binary' }, ...authErrors },
    },
  }, async (request, reply) => {
    const served = ctx.model.byId(request.params.id);
    const bundle = await options.emulators.get(served, requestOf(served, request.query), request.caller.tenant);
    return sendListedFile(reply, bundle, request.params.name, (name, files) => new CloudError('TANDEM_EMULATOR_FILE_UNKNOWN', { name, files }));
  });

  app.post<{ Params: { id: string }; Body: EvaluateBody | undefined }>('/models/:id/adapters/evaluate', {
    // A JSON body is bounded before it is read (its parse and base64 cost the node's thread); a form streams.
    bodyLimit: Math.min(MAX_JSON_ADAPTER_BODY_BYTES, maxBody),
    schema: {
      summary: 'plug an adapter into the full model and evaluate it on the data sent; nothing is stored after the response. multipart/form-data (its files as they are) or JSON (weights in base64, at most 4 MiB)',
      tags: ['emulators'], security,
      params: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } },
      body: { content: { 'application/json': { schema: evaluateBodySchema }, 'multipart/form-data': { schema: evaluateFormSchema } } },
      response: {
        200: {
          type: 'object',
          required: ['model', 'contentHash', 'plugIn', 'baseline', 'examples'],
          properties: {
            model: { type: 'string' }, contentHash: { type: 'string' },
            plugIn: figuresSchema, baseline: figuresSchema,
            examples: { type: 'integer' }, peftType: { type: 'string' }, adapterTensors: { type: 'integer' },
          },
        },
        413: errorSchema,
        ...authErrors,
      },
    },
  }, async (request) => {
    const served = ctx.model.byId(request.params.id);
    // Held before a form is read: a tenant at its quota costs the node no upload.
    const release = options.quotas.holdAdapter(request.caller.tenant);
    try {
      const checkBase = (hash: string): void => {
        try {
          checkAdapterBase(hash, served.contentHash, served.id);
        } catch (cause) {
          throw new CloudError('TANDEM_ADAPTER_BASE_MISMATCH', { actual: hash, model: served.id, expected: served.contentHash }, { cause });
        }
      };
      const body = request.isMultipart() ? await evaluationOfForm(request, maxBody, maxText, checkBase, options.formIdleTimeoutMs) : evaluationOfJson(jsonBodyOf<EvaluateBody>(request), served.id);
      checkBase(body.baseContentHash);
      const textBytes = Buffer.byteLength(body.data.text, 'utf8');
      if (textBytes > maxText) throw new CloudError('TANDEM_EVAL_DATA_INVALID', { reason: `the text holds ${textBytes} bytes; the limit is ${maxText}` });
      const seqLen = body.seqLen ?? Math.min(256, served.config.maxPositionEmbeddings);
      if (seqLen > served.config.maxPositionEmbeddings) throw new CloudError('TANDEM_EVAL_DATA_INVALID', { reason: `seqLen ${seqLen} exceeds the model's ${served.config.maxPositionEmbeddings} positions` });
      const result = await options.evaluator.evaluate(served, body.adapter, body.data, { seqLen, batchSize: body.batchSize ?? 8 });
      return { model: served.id, contentHash: served.contentHash, ...result };
    } finally {
      release();
    }
  });
}

/** An evaluation request, read from JSON or a form. */
interface EvaluationRequest {
  baseContentHash: string;
  adapter: AdapterFiles;
  data: EvaluationData;
  seqLen?: number;
  batchSize?: number;
}

function evaluationOfJson(body: EvaluateBody, model: string): EvaluationRequest {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body.adapter.weights)) throw new CloudError('TANDEM_ADAPTER_INVALID', { model, reason: 'adapter.weights must be base64' });
  const weights = new Uint8Array(Buffer.from(body.adapter.weights, 'base64'));
  return { baseContentHash: body.baseContentHash, adapter: { config: body.adapter.config, weights }, data: body.data, seqLen: body.seqLen, batchSize: body.batchSize };
}

/** The form's parts: the adapter's two files and the data as files (config may be a field), the numbers as fields. */
async function evaluationOfForm(request: FastifyRequest, maxWeights: number, maxText: number, checkBase: (hash: string) => void, idleTimeoutMs: number | undefined): Promise<EvaluationRequest> {
  const form = await readAdapterForm(request, {
    idleTimeoutMs,
    onField: (name, value) => {
      if (name === 'baseContentHash') checkBase(value);
    },
    fields: ['baseContentHash', 'seqLen', 'batchSize', 'config', 'dataName'],
    files: {
      weights: { bytes: maxWeights },
      config: { bytes: MAX_FORM_FIELD_BYTES },
      data: { bytes: maxText, refuse: (limit) => new CloudError('TANDEM_EVAL_DATA_INVALID', { reason: `the text holds more than ${limit} bytes; the limit is ${limit}` }) },
    },
  });
  const weights = form.files.get('weights');
  const data = form.files.get('data');
  if (weights === undefined) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: 'the form has no "weights" part (adapter_model.safetensors)' });
  if (data === undefined) throw new CloudError('TANDEM_REQUEST_INVALID', { reason: 'the form has no "data" part (the evaluation text or .jsonl)' });
  const config = form.files.get('config')?.toString('utf8') ?? requiredField(form, 'config');
  const name = form.fields.get('dataName') ?? form.fileNames.get('data') ?? 'data.txt';
  return {
    baseContentHash: requiredField(form, 'baseContentHash'),
    adapter: { config, weights: new Uint8Array(weights.buffer, weights.byteOffset, weights.byteLength) },
    data: { name: name.slice(0, 256), text: data.toString('utf8') },
    seqLen: integerField(form, 'seqLen', 2, 1_000_000), batchSize: integerField(form, 'batchSize', 1, MAX_EVAL_BATCH),
  };
}
