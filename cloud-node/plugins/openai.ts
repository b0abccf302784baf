// The OpenAI-compatible generation API: POST /v1/completions and /v1/chat/completions over the
// base model and the adapters the caller may use, named "base:adapter" as vLLM names LoRAs.
// Errors here take OpenAI's shape, {error: {message, type, param, code}}, with Tandem's stable
// code as `code`, so that OpenAI clients read them.
import { randomUUID } from 'node:crypto';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { CloudError, resourceErrorOf } from '../errors.ts';
import type { ServedAdapterRecord } from '../serving/adapter-registry.ts';
import { CompletionText } from '../serving/completion-text.ts';
import { chatPrompt, chatRequest, completionRequest, DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS } from '../serving/openai-request.ts';
import type { SamplingRequest } from '../serving/openai-request.ts';
import { promptIds as promptIdsOf } from '../serving/prompt-ids.ts';
import type { GenerationOutcome } from '../serving/scheduler.ts';
import type { Serving } from '../serving/serving.ts';

export interface OpenAiPluginOptions {
  serving: Serving;
}

const TYPE_OF_STATUS: Record<number, string> = {
  400: 'invalid_request_error', 401: 'authentication_error', 403: 'permission_error', 404: 'not_found_error', 409: 'conflict_error', 413: 'invalid_request_error', 414: 'invalid_request_error', 415: 'invalid_request_error', 429: 'rate_limit_error',
};

/** OpenAI's error body for any error a route of this plugin raises. */
export function openAiError(error: unknown, log: FastifyRequest['log']): { status: number; body: { error: { message: string; type: string; param: string | null; code: string } } } {
  let cloud: CloudError;
  let status: number;
  if (error instanceof CloudError) {
    cloud = error;
    status = error.status;
  } else {
    const fastifyError = error as FastifyError;
    const resource = resourceErrorOf(error, 'memory');
    if (resource !== undefined) {
      cloud = resource;
      status = resource.status;
    } else if (fastifyError.validation !== undefined || (fastifyError.statusCode !== undefined && fastifyError.statusCode < 500)) {
      cloud = new CloudError('TANDEM_REQUEST_INVALID', { reason: fastifyError.message });
      status = fastifyError.statusCode ?? 400;
    } else {
      log.error({ err: error }, 'unexpected error in an OpenAI route');
      cloud = new CloudError('TANDEM_INTERNAL', { reason: 'see the node log' });
      status = 500;
    }
  }
  const field = cloud.details.field;
  return { status, body: { error: { message: cloud.describe(), type: TYPE_OF_STATUS[status] ?? 'server_error', param: typeof field === 'string' ? field : null, code: cloud.code } } };
}

const sendOpenAiError = (error: unknown, request: FastifyRequest, reply: FastifyReply): FastifyReply => {
  const { status, body } = openAiError(error, request.log);
  return reply.code(status).send(body);
};

/** The models the caller may name: the base, then "base:adapter" for each adapter it may use. */
export function modelsFor(serving: Serving, tenant: string): { id: string; object: 'model'; created: number; owned_by: string; root: string; parent: string | null }[] {
  const served = serving.runtime().served;
  const base = { id: served.id, object: 'model' as const, created: 0, owned_by: 'tandem', root: served.id, parent: null };
  return [base, ...serving.registry.visibleTo(tenant).map(({ ref, record }) => ({
    id: `${served.id}:${ref}`, object: 'model' as const, created: Math.floor(Date.parse(record.createdAt) / 1000), owned_by: record.tenant, root: served.id, parent: served.id,
  }))];
}

/** The adapter a model name asks for (undefined: the base); another tenant's private adapter is unknown, as a name nobody uses. */
function adapterOf(serving: Serving, tenant: string, model: string): ServedAdapterRecord | undefined {
  const base = serving.runtime().served.id;
  if (model === base) return undefined;
  const unknown = new CloudError('TANDEM_SERVE_MODEL_UNKNOWN', { model: JSON.stringify(model), field: 'model' });
  if (!model.startsWith(`${base}:`)) throw unknown;
  const record = serving.registry.resolve(tenant, model.slice(base.length + 1));
  if (record === undefined) throw unknown;
  return record;
}

interface Prepared {
  adapter?: ServedAdapterRecord;
  promptIds: number[];
  maxTokens: number;
}

function prepare(serving: Serving, tenant: string, req: SamplingRequest, prompt: string, defaultMaxTokens: number): Prepared {
  const { served, tokenizer } = serving.runtime();
  const adapter = adapterOf(serving, tenant, req.model);
  const context = served.config.maxPositionEmbeddings;
  const promptIds = promptIdsOf(tokenizer, prompt, context);
  const maxTokens = req.maxTokens ?? Math.min(defaultMaxTokens, context - promptIds.length);
  if (promptIds.length + maxTokens > context) {
    throw new CloudError('TANDEM_SERVE_MAX_TOKENS_TOO_LARGE', { actual: maxTokens, reason: `the prompt has ${promptIds.length} tokens and the context holds ${context}: at most ${context - promptIds.length}`, field: 'max_tokens' });
  }
  return { adapter, promptIds, maxTokens };
}

type Kind = 'text_completion' | 'chat.completion';

async function generateRoute(serving: Serving, request: FastifyRequest, reply: FastifyReply, kind: Kind): Promise<unknown> {
  const arrived = Date.now();
  const chat = kind === 'chat.completion';
  const req = chat ? chatRequest(request.body) : completionRequest(request.body);
  const prompt = chat ? chatPrompt((req as ReturnType<typeof chatRequest>).messages) : (req as ReturnType<typeof completionRequest>).prompt;
  // A chat reply ends where the model starts the user's next line.
  const stop = chat && req.stop.length < 4 ? [...req.stop, '\nUser:'] : req.stop;
  const p = prepare(serving, request.caller.tenant, req, prompt, chat ? DEFAULT_CHAT_MAX_TOKENS : DEFAULT_COMPLETION_MAX_TOKENS);
  const { scheduler, tokenizer } = serving.runtime();
  const id = `${chat ? 'chatcmpl' : 'cmpl'}-${randomUUID().replaceAll('-', '')}`;
  const created = Math.floor(arrived / 1000);
  const text = new CompletionText(tokenizer, p.promptIds, stop);
  // onToken returning true ends the request (the streaming client went away).
  const submit = (onToken?: () => boolean): Promise<GenerationOutcome> => scheduler.submit({
    tenant: request.caller.tenant, adapter: p.adapter, promptIds: p.promptIds, maxTokens: p.maxTokens, temperature: req.temperature, topP: req.topP, seed: req.seed,
    deadline: req.deadlineMs === undefined ? undefined : arrived + req.deadlineMs, ignoreEos: req.ignoreEos,
    onToken: (tokenId) => {
      const stopped = text.push(tokenId);
      return onToken?.() === true || stopped;
    },
  });
  const usage = (o: GenerationOutcome) => ({ prompt_tokens: p.promptIds.length, completion_tokens: o.generatedIds.length, total_tokens: p.promptIds.length + o.generatedIds.length });
  const extension = (o: GenerationOutcome) => ({ token_ids: o.generatedIds, deadline_missed: o.deadlineMissed, time_to_first_token_seconds: o.timeToFirstToken });
  if (!req.stream) {
    const o = await submit();
    const finish = text.stopped ? 'stop' : o.finishReason;
    const choice = chat
      ? { index: 0, message: { role: 'assistant', content: text.text }, finish_reason: finish, logprobs: null, ...extension(o) }
      : { index: 0, text: text.text, finish_reason: finish, logprobs: null, ...extension(o) };
    return { id, object: kind, created, model: req.model, choices: [choice], usage: usage(o) };
  }
  // Server-sent events: one `data: <chunk>` per piece of text, then `data: [DONE]`.
  const object = chat ? 'chat.completion.chunk' : 'text_completion';
  const chunk = (delta: string | undefined, finish: string | null, extra: Record<string, unknown> = {}): string => {
    const choice = chat
      ? { index: 0, delta: delta === undefined ? {} : { ...(extra.first === true ? { role: 'assistant' } : {}), content: delta }, finish_reason: finish, logprobs: null }
      : { index: 0, text: delta ?? '', finish_reason: finish, logprobs: null };
    const { first: _first, ...rest } = extra;
    return `data: ${JSON.stringify({ id, object, created, model: req.model, choices: [choice], ...rest })}\n\n`;
  };
  // A refusal known now is an HTTP error, not a 200 followed by an error event.
  scheduler.check({ tenant: request.caller.tenant, promptIds: p.promptIds, maxTokens: p.maxTokens });
  reply.hijack();
  const raw = reply.raw;
  raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
  if (chat) raw.write(chunk('', null, { first: true }));
  try {
    const o = await submit(() => {
      if (raw.destroyed) return true;
      const piece = text.take();
      if (piece.length > 0) raw.write(chunk(piece, null));
      return false;
    });
    if (raw.destroyed) return reply;
    const rest = text.take(true);
    if (rest.length > 0) raw.write(chunk(rest, null));
    raw.write(chunk(chat ? undefined : '', text.stopped ? 'stop' : o.finishReason, { usage: usage(o), ...extension(o) }));
  } catch (error) {
    // Headers are sent: the error travels as one more event, in OpenAI's error shape.
    raw.write(`data: ${JSON.stringify(openAiError(error, request.log).body)}\n\n`);
  }
  raw.end('data: [DONE]\n\n');
  return reply;
}

const samplingProperties = {
  model: { type: 'string', description: 'the base model id, or "base:adapter" (GET /v1/models lists them); a shared adapter of another tenant is "base:owner/adapter"' },
  max_tokens: { type: ['integer', 'null'] },
  temperature: { type: ['number', 'null'], description: '0 is greedy' },
  top_p: { type: ['number', 'null'] },
  seed: { type: ['integer', 'null'], description: 'seeds sampling; the same seed gives the same tokens' },
  stop: { description: 'a string or up to 4 strings' },
  stream: { type: ['boolean', 'null'] },
  n: { type: ['integer', 'null'], description: 'only 1' },
  deadline_ms: { type: ['integer', 'null'], description: 'Tandem extension: finish within this many milliseconds of arrival; earlier deadlines are admitted first' },
  ignore_eos: { type: ['boolean', 'null'], description: 'extension (vLLM\'s): generate max_tokens tokens, past eos' },
} as const;

const openAiErrorSchema = {
  type: 'object',
  properties: { error: { type: 'object', properties: { message: { type: 'string' }, type: { type: 'string' }, param: { type: ['string', 'null'] }, code: { type: 'string' } } } },
} as const;

export async function openAiPlugin(app: FastifyInstance, ctx: OpenAiPluginOptions): Promise<void> {
  app.setErrorHandler((error, request, reply) => sendOpenAiError(error, request, reply));
  const security = [{ bearer: [] }];
  const errors = { 400: openAiErrorSchema, 401: openAiErrorSchema, 404: openAiErrorSchema, 429: openAiErrorSchema, 503: openAiErrorSchema };
  app.post('/completions', {
    schema: {
      summary: 'OpenAI completions over the base model or one of the caller\'s adapters ("stream": true for server-sent events)', tags: ['serving'], security,
      body: { type: 'object', additionalProperties: true, properties: { ...samplingProperties, prompt: { description: 'a string, or a list of one string' } } },
      response: errors,
    },
  }, async (request, reply) => generateRoute(ctx.serving, request, reply, 'text_completion'));
  app.post('/chat/completions', {
    schema: {
      summary: 'OpenAI chat completions; the prompt is built with Tandem\'s plain chat template (see README.md)', tags: ['serving'], security,
      body: { type: 'object', additionalProperties: true, properties: { ...samplingProperties, messages: { type: 'array' } } },
      response: errors,
    },
  }, async (request, reply) => generateRoute(ctx.serving, request, reply, 'chat.completion'));
}
