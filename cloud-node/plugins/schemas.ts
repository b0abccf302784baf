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
