// GET /v1/sessions/:id/losses: a session's training loss curve as its edge reported it, for the
// tenant's dashboard. Another tenant's session answers 404 TANDEM_SESSION_UNKNOWN, like a missing one.
import type { FastifyInstance } from 'fastify';
import type { SessionRecords } from '../state/session-records.ts';
import type { TrainingActivity } from '../training-activity.ts';
import { authErrors, security, sessionLossesSchema } from './schemas.ts';

export interface LossesPluginOptions {
  sessions: SessionRecords;
  activity: TrainingActivity;
}

const idParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', maxLength: 256 } } } as const;

export async function lossesPlugin(app: FastifyInstance, options: LossesPluginOptions): Promise<void> {
  app.get<{ Params: { id: string } }>('/sessions/:id/losses', {
    schema: {
      summary: "a session's training loss curve, one point per step (the caller's sessions; the admin's: any)",
      tags: ['sessions'], security, params: idParams, response: { 200: sessionLossesSchema, ...authErrors },
    },
  }, async (request) => {
    const session = options.sessions.get(request.caller, request.params.id);
    return {
      sessionId: session.id, tenant: session.tenant, state: session.state,
      trainedTokens: options.activity.trainedTokensOf(session.id), points: options.activity.losses.points(session.id),
    };
  });
}
