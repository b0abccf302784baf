// The models this node serves and the edge part of each for download.
import type { FastifyInstance } from 'fastify';
import type { ModelSlot } from '../context.ts';
import { CloudError } from '../errors.ts';
import type { ServedModel } from '../served-model.ts';
import { sendListedFile } from './files.ts';
import { authErrors, cutSchema, security } from './schemas.ts';

export interface ModelsPluginOptions {
  model: ModelSlot;
  /** OpenAI's list (`object`, `data`) of what the caller may generate with: the base and its "base:adapter" names. */
  generationModels?: (tenant: string) => unknown[];
}

const openAiModelSchema = {
  type: 'object',
  properties: { id: { type: 'string' }, object: { type: 'string' }, created: { type: 'integer' }, owned_by: { type: 'string' }, root: { type: 'string' }, parent: { type: ['string', 'null'] } },
} as const;

const modelSchema = {
  type: 'object',
  required: ['id', 'modelType', 'contentHash', 'numLayers', 'config', 'cuts', 'defaultCut'],
  properties: {
    id: { type: 'string' },
    modelType: { type: 'string' },
    contentHash: { type: 'string', description: '"sha256:<hex>" of what the weights compute (model/ content hash)' },
    numLayers: { type: 'integer' },
    config: { type: 'object', additionalProperties: true, description: 'config.json as the model folder has it' },
    cuts: {
      type: 'object',
      required: ['minBottom', 'minTop', 'maxBottomPlusTop'],
      properties: { minBottom: { type: 'integer' }, minTop: { type: 'integer' }, maxBottomPlusTop: { type: 'integer' } },
    },
    defaultCut: cutSchema,
  },
} as const;

const cutQuery = {
  type: 'object',
  properties: { bottom: { type: 'integer', minimum: 0 }, top: { type: 'integer', minimum: 0 } },
} as const;

interface CutQuery {
  bottom?: number;
  top?: number;
}

function cutOf(served: ServedModel, query: CutQuery) {
  const fallback = served.defaultCut;
  return { bottom: query.bottom ?? fallback.bottom, top: query.top ?? fallback.top };
}

function describe(served: ServedModel) {
  return {
    id: served.id,
    modelType: served.config.modelType,
    contentHash: served.contentHash,
    numLayers: served.numLayers,
    config: served.rawConfig,
    cuts: served.cutLimits,
    defaultCut: served.defaultCut,
  };
}

export async function modelsPlugin(app: FastifyInstance, ctx: ModelsPluginOptions): Promise<void> {
  app.get('/models', {
    schema: {
      summary: 'the models this node serves', tags: ['models'], security,
      response: {
        200: {
          type: 'object', required: ['models'],
          properties: {
            models: { type: 'array', items: modelSchema },
            object: { type: 'string', enum: ['list'], description: 'OpenAI\'s list of models (GET /v1/models of the OpenAI API)' },
            data: { type: 'array', items: openAiModelSchema, description: 'the base and the adapters this key may use, as "base:adapter"' },
          },
        },
        ...authErrors,
      },
    },
  }, async (request) => ({ models: [describe(ctx.model.served())], ...(ctx.generationModels === undefined ? {} : { object: 'list', data: ctx.generationModels(request.caller.tenant) }) }));

  app.get<{ Params: { id: string }; Querystring: CutQuery }>('/models/:id/edge', {
    schema: {
      summary: 'manifest of the edge part of a model for a cut: embedding, blocks [0, bottom) and [L-top, L), final norm, head, tokenizer',
      tags: ['models'], security,
      params: { type: 'object', required: ['id'], properties: { id: { type: 'string' } } },
      querystring: cutQuery,
      response: {
        200: {
          type: 'object',
          required: ['model', 'contentHash', 'cut', 'files'],
          properties: {
            model: { type: 'string' },
            contentHash: { type: 'string' },
            cut: cutSchema,
            files: {
              type: 'array',
              items: { type: 'object', required: ['name', 'bytes', 'sha256'], properties: { name: { type: 'string' }, bytes: { type: 'integer' }, sha256: { type: 'string' } } },
            },
          },
        },
        ...authErrors,
      },
    },
  }, async (request) => {
    const served = ctx.model.byId(request.params.id);
    const bundle = await served.edgeBundle(cutOf(served, request.query));
    return { model: served.id, contentHash: served.contentHash, cut: bundle.cut, files: bundle.files };
  });

  app.get<{ Params: { id: string; name: string }; Querystring: CutQuery }>('/models/:id/edge/files/:name', {
    schema: {
      summary: 'one file of the edge part; its sha256 is in the manifest and in the x-tandem-sha256 header',
      tags: ['models'], security,
      params: { type: 'object', required: ['id', 'name'], properties: { id: { type: 'string' }, name: { type: 'string' } } },
      querystring: cutQuery,
      response: { 200: { type: 'string', format: 'binary' }, ...authErrors },
    },
  }, async (request, reply) => {
    const served = ctx.model.byId(request.params.id);
    const bundle = await served.edgeBundle(cutOf(served, request.query));
    return sendListedFile(reply, bundle, request.params.name, (name, files) => new CloudError('TANDEM_EDGE_FILE_UNKNOWN', { name, files }));
  });
}
