// Federations on the node: the admin creates one and reads its status and global adapter;
// invited owners (tenants) ask for their round and send their updates.
import type { FastifyInstance } from 'fastify';
import type { FederationCreate, RoundUpdate } from '../../protocol/index.ts';
import type { CloudContext } from '../context.ts';
import { CoordinatorError } from '../federation/index.ts';
import type { Coordinator } from '../federation/index.ts';
import { callerOf, requireAdmin, requireCaller } from './auth.ts';
import { authErrors, security } from './schemas.ts';

export const DEFAULT_FEDERATION_BODY_BYTES = 64 * 1024 * 1024;

export interface FederationsPluginOptions extends CloudContext {
  coordinator: Coordinator;
  maxBodyBytes?: number;
}

const anyObject = { type: 'object', additionalProperties: true } as const;
const idParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 64 } } } as const;
const roundParams = { type: 'object', required: ['id', 'round'], properties: { id: { type: 'string', maxLength: 64 }, round: { type: 'integer', minimum: 0 } } } as const;

export async function federationsPlugin(app: FastifyInstance, options: FederationsPluginOptions): Promise<void> {
  const { coordinator } = options;
  const bodyLimit = options.maxBodyBytes ?? DEFAULT_FEDERATION_BODY_BYTES;
  app.addHook('onRequest', requireCaller(options.keys));
  app.setErrorHandler((error, _request, reply) => {
    if (error instanceof CoordinatorError) return reply.code(error.status).send({ code: error.code, message: error.message, details: error.details });
    throw error;
  });

  app.post<{ Body: FederationCreate }>('/federations', {
    bodyLimit,
    schema: {
      summary: 'create a federation: model, adapter (initial global), mode, rounds, owners, sampling, minimum owners, local steps, deadline, aggregation, DP',
      tags: ['federations'], security, body: { type: 'object', required: ['id', 'adapter'], additionalProperties: true },
      response: { 201: anyObject, ...authErrors },
    },
  }, async (request, reply) => {
    requireAdmin(request, 'creating a federation');
    return reply.code(201).send(await coordinator.create(request.body));
  });

  app.get<{ Params: { id: string } }>('/federations/:id', {
    schema: { summary: 'status: rounds, participants, per-round loss, validation, bytes, ε', tags: ['federations'], security, params: idParams, response: { 200: anyObject, ...authErrors } },
  }, async (request) => {
    const caller = callerOf(request);
    const status = coordinator.status(request.params.id);
    if (!caller.admin && !status.owners.includes(caller.tenant)) throw new CoordinatorError('TANDEM_FED_NOT_INVITED', { tenant: caller.tenant, federation: request.params.id });
    return status;
  });

  app.get<{ Params: { id: string } }>('/federations/:id/adapter', {
    schema: { summary: 'the global adapter (adapter_config.json text and tensors)', tags: ['federations'], security, params: idParams, response: { 200: anyObject, ...authErrors } },
  }, async (request) => {
    requireAdmin(request, 'exporting a federation adapter');
    return coordinator.globalAdapter(request.params.id);
  });

  app.get<{ Params: { id: string } }>('/federations/:id/round', {
    schema: { summary: "the caller's assignment: round, attempt, whether sampled, and the global adapter when it is", tags: ['federations'], security, params: idParams, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.assignment(request.params.id, callerOf(request).tenant));

  app.post<{ Params: { id: string; round: number }; Body: RoundUpdate }>('/federations/:id/rounds/:round/updates', {
    bodyLimit,
    schema: { summary: "an owner's update for a round (delta from the global adapter)", tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt', 'examples', 'values', 'loss'], additionalProperties: true }, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.submit(request.params.id, callerOf(request).tenant, request.params.round, request.body));
}
