// An adapter's files sent as multipart/form-data (`curl -F config=@adapter_config.json -F
// weights=@adapter_model.safetensors -F name=x ...`): the parts are streamed and copied as
// they arrive, so a large upload costs the node's thread a copy of its bytes, not a JSON
// parse and a base64 decode of them (a 63 MB JSON body took 0.5-1.5 s of the event loop even
// when refused). Every part is named and bounded before it is read: an unknown part, a part
// twice, a field or a file over its limit are refused with a typed error, and nothing of the
// request is kept past it.
import type { FastifyRequest } from 'fastify';
import { CloudError } from '../errors.ts';
import { tooLarge } from './bounded-body.ts';

/** A file part's largest size, and the error past it (413 TANDEM_REQUEST_INVALID by default). */
export interface FilePartLimit {
  bytes: number;
  refuse?: (bytes: number) => Error;
}

/** What a route takes: its text fields and its files. */
export interface FormSpec {
  fields: readonly string[];
  files: Readonly<Record<string, FilePartLimit>>;
  /**
   * Checks a text field as it arrives, before the parts after it are read: a form that sends
   * its fields first is refused for a wrong one without its files crossing the network.
   */
  onField?: (name: string, value: string) => void;
  /** A form that sends nothing for this long is dropped (FORM_IDLE_TIMEOUT_MS). */
  idleTimeoutMs?: number;
}

export interface AdapterForm {
  fields: Map<string, string>;
  files: Map<string, Buffer>;
  /** The file name each file part was sent with. */
  fileNames: Map<string, string>;
}

/** A field's largest value (adapter_config.json may come as a field too). */
export const MAX_FORM_FIELD_BYTES = 64 * 1024;

/**
 * A form that sends nothing for this long (30 s) is dropped: the connection is closed and what
 * its route held for the tenant (an upload's place, TenantQuotas.storedAdapters) is free again,
 * where a stalled form would otherwise keep it until the server's request timeout (300 s).
 */
export const FORM_IDLE_TIMEOUT_MS = 30_000;

/** JSON bodies of the adapter routes (base64 weights): larger adapters go as multipart/form-data. */
export const MAX_JSON_ADAPTER_BODY_BYTES = 4 * 1024 * 1024;

/** The multipart options of a route's scope: no part read beyond what any route names. */
export const MULTIPART_OPTIONS = { limits: { fieldNameSize: 64, fieldSize: MAX_FORM_FIELD_BYTES, fields: 16, files: 4, parts: 16, headerPairs: 16 } } as const;

function invalid(reason: string): CloudError {
  return new CloudError('TANDEM_REQUEST_INVALID', { reason });
}

/**
 * Reads the form's parts: each text field and file `spec` names at most once (a file part may
 * also carry a field `spec` names, as `curl -F config=@file` sends it). A file over its size is
 * 413 TANDEM_REQUEST_INVALID naming the part and the limit, as a JSON body over its limit is.
 */
export async function readAdapterForm(request: FastifyRequest, spec: FormSpec): Promise<AdapterForm> {
  const fields = new Map<string, string>();
  const files = new Map<string, Buffer>();
  const fileNames = new Map<string, string>();
  const largest = Math.max(1, ...Object.values(spec.files).map((f) => f.bytes));
  // Every part and every chunk of a file re-arms one timer; when it fires the request is
  // destroyed, which ends the parts' stream, and the wait below is refused at once.
  const idleMs = spec.idleTimeoutMs ?? FORM_IDLE_TIMEOUT_MS;
  let timer: NodeJS.Timeout | undefined;
  const stalled = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      request.log.warn({ url: request.url, idleMs }, 'a form sent nothing for its idle timeout: its connection is closed');
      reject(new CloudError('TANDEM_BODY_STALLED', { seconds: idleMs / 1000 }));
      request.raw.destroy();
    }, idleMs);
  });
  stalled.catch(() => undefined);
  const activity = (): void => void timer?.refresh();
  const read = async (): Promise<void> => {
    for await (const part of request.parts({ limits: { ...MULTIPART_OPTIONS.limits, fileSize: largest } })) {
      activity();
      const name = part.fieldname;
      if (fields.has(name) || files.has(name)) throw invalid(`the form has part ${JSON.stringify(name)} twice`);
      if (part.type === 'field') {
        if (!spec.fields.includes(name)) throw invalid(`the form has a part ${JSON.stringify(name.slice(0, 64))}; it takes ${[...spec.fields, ...Object.keys(spec.files)].join(', ')}`);
        if (part.valueTruncated) throw new CloudError('TANDEM_FIELD_TOO_LONG', { field: name, actual: `over ${MAX_FORM_FIELD_BYTES} bytes`, limit: MAX_FORM_FIELD_BYTES });
        fields.set(name, String(part.value));
        spec.onField?.(name, String(part.value));
        continue;
      }
      const limit = spec.files[name];
      if (limit === undefined) {
        if (!spec.fields.includes(name)) throw invalid(`the form has a part ${JSON.stringify(name.slice(0, 64))}; it takes ${[...spec.fields, ...Object.keys(spec.files)].join(', ')}`);
        // A text field sent as a file: read within the field limit.
        const value = (await readPart(part.file, MAX_FORM_FIELD_BYTES, () => new CloudError('TANDEM_FIELD_TOO_LONG', { field: name, actual: `over ${MAX_FORM_FIELD_BYTES} bytes`, limit: MAX_FORM_FIELD_BYTES }), activity)).toString('utf8');
        fields.set(name, value);
        spec.onField?.(name, value);
        continue;
      }
      if (part.filename !== undefined && part.filename !== '') fileNames.set(name, part.filename);
      files.set(name, await readPart(part.file, limit.bytes, () => (limit.refuse ?? ((bytes) => tooLarge(`part ${JSON.stringify(name)}`, bytes)))(limit.bytes), activity));
    }
  };
  try {
    const reading = read();
    reading.catch(() => undefined); // after a stall it may still fail: the race has answered
    await Promise.race([reading, stalled]);
  } catch (error) {
    if (error instanceof CloudError || (error as { statusCode?: unknown }).statusCode === 413) throw error;
    const code = (error as { code?: unknown }).code;
    if (code === 'FST_PARTS_LIMIT' || code === 'FST_FILES_LIMIT' || code === 'FST_FIELDS_LIMIT') throw invalid(`the form has too many parts: at most ${MULTIPART_OPTIONS.limits.parts}`);
    throw invalid(`the form is not valid multipart/form-data: ${(error as Error).message}`);
  } finally {
    clearTimeout(timer);
  }
  return { fields, files, fileNames };
}


/** A part's bytes, refused as soon as they pass `limit` (the rest of the stream is not kept); `onChunk` hears each chunk. */
async function readPart(stream: AsyncIterable<Buffer> & { truncated?: boolean }, limit: number, refuse: () => Error, onChunk: () => void): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let bytes = 0;
  for await (const chunk of stream) {
    onChunk();
    bytes += chunk.byteLength;
    if (bytes > limit) throw refuse();
    chunks.push(chunk);
  }
  if (stream.truncated === true) throw refuse();
  return Buffer.concat(chunks, bytes);
}

/** A required field, or a typed refusal naming it. */
/**
 * The body of a route that takes JSON or a form, when it is not a form. The route's schema checks
 * JSON only: a body of another type (text/plain, which fastify parses to a string) or none at
 * all is TANDEM_REQUEST_INVALID here, before a handler reads a field of it.
 */
export function jsonBodyOf<T>(request: FastifyRequest): T {
  const body = request.body;
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new CloudError('TANDEM_REQUEST_INVALID', { reason: `the body must be JSON (application/json) or a form (multipart/form-data), not ${request.headers['content-type'] === undefined ? 'absent' : JSON.stringify(String(request.headers['content-type']).slice(0, 64))}` });
  }
  return body as T;
}

export function requiredField(form: AdapterForm, name: string): string {
  const value = form.fields.get(name);
  if (value === undefined) throw invalid(`the form has no ${JSON.stringify(name)} part`);
  return value;
}

/** An optional integer field within [min, max]. */
export function integerField(form: AdapterForm, name: string, min: number, max: number): number | undefined {
  const value = form.fields.get(name);
  if (value === undefined) return undefined;
  if (!/^\d{1,9}$/.test(value) || Number(value) < min || Number(value) > max) throw invalid(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(value.slice(0, 32))}`);
  return Number(value);
}

/** An optional boolean field: "true" or "false". */
export function booleanField(form: AdapterForm, name: string): boolean | undefined {
  const value = form.fields.get(name);
  if (value === undefined) return undefined;
  if (value !== 'true' && value !== 'false') throw invalid(`${name} must be true or false, got ${JSON.stringify(value.slice(0, 32))}`);
  return value === 'true';
}
