// Federations on the node: the admin creates one and reads its status and global adapter;
// invited owners (tenants) ask for their round and send their updates.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { FederationCreate, RoundUpdate, SecAggKeys, SecAggReveal, SecAggShares } from '../../protocol/index.ts';
import { CoordinatorError } from '../federation/index.ts';
import type { Coordinator, FederationBodyKind } from '../federation/index.ts';
import { requireAdmin } from './auth.ts';
import { boundedBody } from './bounded-body.ts';
import { authErrors, security } from './schemas.ts';

export const DEFAULT_FEDERATION_BODY_BYTES = 64 * 1024 * 1024;

export interface FederationsPluginOptions {
  coordinator: Coordinator;
  maxBodyBytes?: number;
}

const anyObject = { type: 'object', additionalProperties: true } as const;
const idParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 64 } } } as const;
const roundParams = { type: 'object', required: ['id', 'round'], properties: { id: { type: 'string', maxLength: 64 }, round: { type: 'integer', minimum: 0 } } } as const;

export async function federationsPlugin(app: FastifyInstance, options: FederationsPluginOptions): Promise<void> {
  const { coordinator } = options;
  const bodyLimit = options.maxBodyBytes ?? DEFAULT_FEDERATION_BODY_BYTES;
  app.setErrorHandler((error, _request, reply) => {
    if (error instanceof CoordinatorError) return reply.code(error.status).send({ code: error.code, message: error.describe(), details: error.details });
    throw error;
  });

  // A body is JSON parsed on the event loop (~1 s for 60 MB of numbers): who may send one is
  // checked before it is read — the admin for a federation (up to 64 MiB), an owner sampled in
  // the round for an update or a secure-aggregation message, held to the size the federation's
  // adapter and sampled owners set.
  const adminOnly = async (request: FastifyRequest): Promise<void> => {
    requireAdmin(request, 'creating a federation');
  };
  const roundBody = (kind: FederationBodyKind) => async (request: FastifyRequest, _reply: FastifyReply, payload: NodeJS.ReadableStream): Promise<NodeJS.ReadableStream> => {
    const { id, round } = request.params as { id: string; round: string };
    // Params are not validated yet: a round that is not a plain integer waits for the schema's own 400.
    if (!/^\d{1,9}$/.test(round)) return payload;
    const limit = coordinator.admitsBody(id, request.caller.tenant, Number(round), kind);
    return boundedBody(request, payload, limit, `a ${kind} body for round ${round} of federation ${id}`);
  };

  app.post<{ Body: FederationCreate }>('/federations', {
    bodyLimit,
    preParsing: adminOnly,
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
    const caller = request.caller;
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
  }, async (request) => coordinator.assignment(request.params.id, request.caller.tenant));

  app.post<{ Params: { id: string; round: number }; Body: RoundUpdate }>('/federations/:id/rounds/:round/updates', {
    bodyLimit,
    preParsing: roundBody('update'),
    schema: { summary: "an owner's update for a round (delta from the global adapter)", tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt', 'examples', 'loss'], additionalProperties: true }, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.submit(request.params.id, request.caller.tenant, request.params.round, request.body));

  app.post<{ Params: { id: string; round: number }; Body: { attempt: number } }>('/federations/:id/rounds/:round/alive', {
    bodyLimit: 1024,
    schema: {
      summary: "a sampled owner's heartbeat while it trains (at least every ownerTimeoutSeconds): whether its round and attempt are still current",
      tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt'], properties: { attempt: { type: 'integer', minimum: 0 } }, additionalProperties: true }, response: { 200: anyObject, ...authErrors },
    },
  }, async (request) => coordinator.alive(request.params.id, request.caller.tenant, request.params.round, request.body.attempt));

  app.get<{ Params: { id: string; round: number } }>('/federations/:id/rounds/:round/secagg', {
    schema: { summary: "the caller's view of the round's secure aggregation: phase, advertised keys, its encrypted shares, survivors", tags: ['federations'], security, params: roundParams, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.secAggView(request.params.id, request.caller.tenant, request.params.round));

  app.post<{ Params: { id: string; round: number }; Body: SecAggKeys }>('/federations/:id/rounds/:round/secagg/keys', {
    preParsing: roundBody('secagg-keys'),
    schema: { summary: 'SecAgg step 1: the owner\'s two X25519 public keys', tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt', 'cipherPublic', 'maskPublic'], additionalProperties: true }, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.advertise(request.params.id, request.caller.tenant, request.params.round, request.body));

  app.post<{ Params: { id: string; round: number }; Body: SecAggShares }>('/federations/:id/rounds/:round/secagg/shares', {
    bodyLimit,
    preParsing: roundBody('secagg-shares'),
    schema: { summary: 'SecAgg step 2: Shamir shares of the owner\'s seeds, one encrypted box per owner', tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt', 'shares'], additionalProperties: true }, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.share(request.params.id, request.caller.tenant, request.params.round, request.body));

  app.post<{ Params: { id: string; round: number }; Body: SecAggReveal }>('/federations/:id/rounds/:round/secagg/reveal', {
    bodyLimit,
    preParsing: roundBody('secagg-reveal'),
    schema: { summary: 'SecAgg step 4: shares of survivors\' self masks and of dropped owners\' mask keys', tags: ['federations'], security, params: roundParams, body: { type: 'object', required: ['attempt', 'selfMask', 'maskKey'], additionalProperties: true }, response: { 200: anyObject, ...authErrors } },
  }, async (request) => coordinator.reveal(request.params.id, request.caller.tenant, request.params.round, request.body));
}
