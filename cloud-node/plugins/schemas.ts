// JSON schemas shared by the REST routes (the OpenAPI document is generated from them).

export const errorSchema = {
  type: 'object',
  required: ['code', 'message'],
  properties: {
    code: { type: 'string', description: 'stable code from cloud-node/errors.ts, e.g. TANDEM_SESSION_UNKNOWN' },
    message: { type: 'string' },
    details: { type: 'object', additionalProperties: true },
  },
} as const;

/** The error responses every authenticated route may give (429: over a tenant quota, the rate limit included). */
export const authErrors = { 401: errorSchema, 403: errorSchema, 404: errorSchema, 409: errorSchema, 400: errorSchema, 429: errorSchema, 503: errorSchema } as const;

export const security = [{ bearer: [] }];

export const cutSchema = {
  type: 'object',
  required: ['bottom', 'top'],
  properties: { bottom: { type: 'integer' }, top: { type: 'integer' } },
} as const;

const codecSpecSchema = {
  type: 'object',
  required: ['codec'],
  properties: {
    codec: { type: 'string' },
    blockSize: { type: 'integer' },
    topkFraction: { type: 'number' },
    topkValues: { type: 'string' },
  },
} as const;

export const sessionSchema = {
  type: 'object',
  required: ['id', 'tenant', 'modelId', 'contentHash', 'state', 'cut', 'codecs', 'lastStep', 'createdAt', 'updatedAt'],
  properties: {
    id: { type: 'string' },
    tenant: { type: 'string' },
    modelId: { type: 'string' },
    contentHash: { type: 'string' },
    state: { type: 'string', enum: ['open', 'closed'] },
    version: { type: 'string', description: 'negotiated protocol version, major.minor' },
    cut: cutSchema,
    codecs: { type: 'object', properties: { forward: codecSpecSchema, backward: codecSpecSchema } },
    limits: {
      type: 'object',
      properties: {
        maxFrameBytes: { type: 'integer' }, maxMessageBytes: { type: 'integer' }, maxRank: { type: 'integer' }, maxDim: { type: 'integer' }, maxElements: { type: 'integer' },
      },
    },
    clientBuild: { type: 'string' },
    lastStep: { type: 'integer', description: 'highest step a Forward or Backward completed for; -1 before the first' },
    createdAt: { type: 'string' },
    updatedAt: { type: 'string' },
    closedAt: { type: 'string' },
    closeReason: { type: 'string' },
  },
} as const;

const count = { type: 'integer', minimum: 0 } as const;
const nullableNumber = { type: 'number', nullable: true } as const;

/** cluster-status.ts's WorkerStatus. */
export const workerStatusSchema = {
  type: 'object',
  required: ['id', 'model', 'blocks', 'load', 'lastSeenMs'],
  properties: {
    id: { type: 'string' },
    model: { type: 'string' },
    blocks: { type: 'object', required: ['start', 'end'], properties: { start: { type: 'integer' }, end: { type: 'integer' } }, description: 'blocks [start, end) of the model that the worker runs' },
    load: { type: 'object', required: ['queued', 'running', 'tokensPerSecond'], properties: { queued: count, running: count, tokensPerSecond: { type: 'number' } } },
    lastSeenMs: { type: 'number', description: 'Unix milliseconds of its last report' },
  },
} as const;

/** One step of a session's loss curve. */
export const lossPointSchema = {
  type: 'object',
  required: ['step', 'loss', 'microbatches'],
  properties: { step: count, loss: { type: 'number' }, microbatches: count },
} as const;

export const sessionLossesSchema = {
  type: 'object',
  required: ['sessionId', 'tenant', 'state', 'trainedTokens', 'points'],
  properties: {
    sessionId: { type: 'string' },
    tenant: { type: 'string' },
    state: { type: 'string', enum: ['open', 'closed'] },
    trainedTokens: count,
    points: { type: 'array', items: lossPointSchema, description: 'one point per step, by step: the edge-reported loss (protocol v1.2 Backward.loss)' },
  },
} as const;

const seriesPointSchema = {
  type: 'object',
  required: ['t', 'trainedTokens', 'trainedTokensPerSecond', 'frameBytesPerSecond', 'stepLatencyMs', 'memory'],
  properties: {
    t: { type: 'number', description: 'Unix milliseconds at the end of the interval' },
    trainedTokens: { ...count, description: 'since the node started, at t' },
    trainedTokensPerSecond: { type: 'number' },
    frameBytesPerSecond: { type: 'object', additionalProperties: { type: 'number' }, description: 'by codec, received and sent together' },
    stepLatencyMs: { type: 'object', required: ['forward', 'backward'], properties: { forward: nullableNumber, backward: nullableNumber }, description: 'mean compute time in the interval; null when none ran' },
    memory: { type: 'object', required: ['rssBytes', 'heapUsedBytes', 'heapTotalBytes'], properties: { rssBytes: count, heapUsedBytes: count, heapTotalBytes: count } },
  },
} as const;

/** GET /v1/cluster. */
export const clusterSchema = {
  type: 'object',
  required: ['model', 'workers', 'tenants', 'sessions', 'federations', 'totals', 'series'],
  properties: {
    model: { type: 'string', nullable: true, description: 'the served model id; null while loading' },
    workers: { type: 'array', items: workerStatusSchema },
    tenants: {
      type: 'array',
      items: { type: 'object', required: ['tenant', 'sessions', 'open', 'closed', 'trainedTokens'], properties: { tenant: { type: 'string' }, sessions: count, open: count, closed: count, trainedTokens: count } },
    },
    sessions: {
      type: 'array',
      items: {
        type: 'object',
        required: ['id', 'tenant', 'state', 'lastStep', 'createdAt', 'trainedTokens', 'lossPoints'],
        properties: { id: { type: 'string' }, tenant: { type: 'string' }, state: { type: 'string', enum: ['open', 'closed'] }, lastStep: { type: 'integer' }, createdAt: { type: 'string' }, trainedTokens: count, lossPoints: count },
      },
    },
    federations: {
      type: 'array',
      items: {
        type: 'object',
        required: ['id', 'model', 'mode', 'state', 'round', 'rounds', 'owners', 'history'],
        properties: {
          id: { type: 'string' }, model: { type: 'string' }, mode: { type: 'string' }, state: { type: 'string' }, round: count, rounds: count, owners: count,
          history: {
            type: 'array',
            description: 'the last rounds completed, oldest first',
            items: { type: 'object', required: ['round', 'participants', 'examples', 'loss', 'completedAt'], properties: { round: count, participants: count, examples: count, loss: nullableNumber, completedAt: { type: 'string' } } },
          },
        },
      },
    },
    totals: {
      type: 'object',
      required: ['trainedTokens', 'steps', 'frameBytes'],
      properties: {
        trainedTokens: count,
        steps: { type: 'object', required: ['forward', 'backward'], properties: { forward: count, backward: count } },
        frameBytes: { type: 'object', additionalProperties: { type: 'object', required: ['in', 'out'], properties: { in: count, out: count } }, description: 'by codec' },
      },
    },
    series: {
      type: 'object',
      required: ['intervalMs', 'points'],
      properties: { intervalMs: count, points: { type: 'array', items: seriesPointSchema } },
    },
  },
} as const;
