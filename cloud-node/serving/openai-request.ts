// Reads an OpenAI completions or chat.completions body: every field checked, with OpenAI's
// names and defaults, each failure a typed error naming the field (`param` in OpenAI's error).
import { CloudError } from '../errors.ts';

export const MAX_STOP_SEQUENCES = 4;
export const MAX_STOP_LENGTH = 256;
export const MAX_CHAT_MESSAGES = 256;
export const MAX_DEADLINE_MS = 3_600_000;
/** max_tokens of a chat request that sets none: what the context leaves, at most this. */
export const DEFAULT_CHAT_MAX_TOKENS = 256;
/** OpenAI's default max_tokens for /v1/completions. */
export const DEFAULT_COMPLETION_MAX_TOKENS = 16;

export interface SamplingRequest {
  model: string;
  maxTokens?: number;
  temperature: number;
  topP: number;
  seed: number;
  stop: string[];
  stream: boolean;
  /** Extension: milliseconds from arrival the request should finish within. */
  deadlineMs?: number;
  /** Extension (vLLM's name): generate max_tokens tokens, past eos. */
  ignoreEos: boolean;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

function invalid(field: string, reason: string): CloudError {
  return new CloudError('TANDEM_REQUEST_INVALID', { reason: `${field} ${reason}`, field });
}

function body(raw: unknown): Record<string, unknown> {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw invalid('the body', 'must be a JSON object');
  return raw as Record<string, unknown>;
}

function num(b: Record<string, unknown>, field: string, min: number, max: number, fallback: number, integer = false): number {
  const v = b[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || (integer && !Number.isSafeInteger(v))) throw invalid(field, `must be ${integer ? 'an integer' : 'a number'}`);
  if (v < min || v > max) throw invalid(field, `must be in [${min}, ${max}], got ${v}`);
  return v;
}

function sampling(b: Record<string, unknown>): SamplingRequest {
  if (typeof b.model !== 'string' || b.model.length === 0 || b.model.length > 256) throw invalid('model', 'must be a non-empty string of at most 256 characters');
  const n = num(b, 'n', 1, 1, 1, true);
  void n;
  let stop: string[] = [];
  if (typeof b.stop === 'string') stop = [b.stop];
  else if (Array.isArray(b.stop)) stop = b.stop as string[];
  else if (b.stop !== undefined && b.stop !== null) throw invalid('stop', 'must be a string or a list of strings');
  if (stop.length > MAX_STOP_SEQUENCES) throw invalid('stop', `holds ${stop.length} sequences; at most ${MAX_STOP_SEQUENCES}`);
  if (stop.some((s) => typeof s !== 'string' || s.length === 0 || s.length > MAX_STOP_LENGTH)) throw invalid('stop', `sequences must be non-empty strings of at most ${MAX_STOP_LENGTH} characters`);
  for (const flag of ['stream', 'ignore_eos']) if (b[flag] !== undefined && b[flag] !== null && typeof b[flag] !== 'boolean') throw invalid(flag, 'must be a boolean');
  const maxTokens = b.max_tokens ?? b.max_completion_tokens;
  const field = b.max_tokens !== undefined ? 'max_tokens' : 'max_completion_tokens';
  if (maxTokens !== undefined && maxTokens !== null && (typeof maxTokens !== 'number' || !Number.isSafeInteger(maxTokens) || maxTokens < 1)) throw invalid(field, 'must be an integer >= 1');
  const deadlineMs = b.deadline_ms === undefined || b.deadline_ms === null ? undefined : num(b, 'deadline_ms', 1, MAX_DEADLINE_MS, 0, true);
  return {
    model: b.model,
    maxTokens: (maxTokens as number | null | undefined) ?? undefined,
    temperature: num(b, 'temperature', 0, 2, 1),
    topP: num(b, 'top_p', Number.MIN_VALUE, 1, 1),
    seed: num(b, 'seed', 0, 2 ** 32 - 1, 0, true),
    stop,
    stream: b.stream === true,
    deadlineMs,
    ignoreEos: b.ignore_eos === true,
  };
}

export function completionRequest(raw: unknown): SamplingRequest & { prompt: string } {
  const b = body(raw);
  let prompt = b.prompt;
  if (Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === 'string') prompt = prompt[0];
  if (typeof prompt !== 'string') throw invalid('prompt', 'must be a string (or a list of one string)');
  return { ...sampling(b), prompt };
}

export function chatRequest(raw: unknown): SamplingRequest & { messages: ChatMessage[] } {
  const b = body(raw);
  const list = b.messages;
  if (!Array.isArray(list) || list.length === 0 || list.length > MAX_CHAT_MESSAGES) throw invalid('messages', `must be a list of 1 to ${MAX_CHAT_MESSAGES} messages`);
  const messages = list.map((m: unknown, i): ChatMessage => {
    const e = (m ?? {}) as Record<string, unknown>;
    const role = e.role === 'developer' ? 'system' : e.role;
    if (role !== 'system' && role !== 'user' && role !== 'assistant') throw invalid(`messages[${i}].role`, 'must be system, developer, user or assistant');
    let content = e.content;
    // The content-part form: [{type: "text", text}].
    if (Array.isArray(content)) content = content.map((p: unknown) => ((p as { type?: unknown })?.type === 'text' && typeof (p as { text?: unknown }).text === 'string' ? (p as { text: string }).text : null)).join('');
    if (typeof content !== 'string' || (Array.isArray(e.content) && (e.content as unknown[]).some((p) => (p as { type?: unknown })?.type !== 'text'))) throw invalid(`messages[${i}].content`, 'must be a string or a list of text parts');
    return { role, content };
  });
  return { ...sampling(b), messages };
}

const ROLE_NAMES: Record<ChatMessage['role'], string> = { system: 'System', user: 'User', assistant: 'Assistant' };

/**
 * The chat template used for every model (Tandem does not run the Jinja templates some
 * tokenizer_config.json files carry): one line per message, "Role: content", then
 * "Assistant:" for the reply, e.g. "System: be brief\nUser: hi\nAssistant:".
 */
export function chatPrompt(messages: readonly ChatMessage[]): string {
  return `${messages.map((m) => `${ROLE_NAMES[m.role]}: ${m.content}`).join('\n')}\nAssistant:`;
}
