// Reading a reply body from the cloud, which may be hostile, never past a limit: a content-length
// over it is refused before a byte is read, and a body that passes it is cancelled at the chunk
// that does. A cloud declaring 100 bytes and sending gigabytes costs the edge the limit and a chunk.
import { EdgeError } from './errors.ts';

/**
 * The most bytes of a JSON reply. The largest the edge reads is GET /v1/models: one model with
 * its config.json (1-2 KiB for Llama-3.1 or Qwen2, tens of KiB with a large id2label) and the
 * "base:adapter" names the key may use (16 by the default quota, about 100 bytes each); an edge
 * manifest lists four files, and a bundle listing a handful with the bundle's manifest.json
 * (about 2 KiB). 4 MiB holds a hundred times the largest of those.
 */
export const MAX_JSON_REPLY_BYTES = 4 * 1024 * 1024;

/** Of an error reply only this much is read: its code and message take far less. */
export const MAX_ERROR_REPLY_BYTES = 64 * 1024;

export interface ReadBodyOptions {
  /** The most bytes to read. */
  limit: number;
  /** The URL, named in errors. */
  where: string;
  /**
   * The error for a body over `limit`: `bytes` is its content-length when `declared`, otherwise
   * how many had arrived when it passed the limit (the rest is not read).
   */
  tooLarge: (bytes: number, declared: boolean) => EdgeError;
}

/** The content-length a reply declares, if it declares a plain one. */
function declaredLength(res: Response): number | undefined {
  const header = res.headers.get('content-length');
  return header !== null && /^\d+$/.test(header.trim()) ? Number(header) : undefined;
}

/**
 * At most `limit` bytes of the body; `passed` is how many had arrived when the body passed the
 * limit, which is then cancelled. A body that fails while streaming is TANDEM_EDGE_HTTP_FAILED.
 */
async function readUpTo(res: Response, limit: number, where: string): Promise<{ bytes: Uint8Array; passed?: number }> {
  if (res.body === null) return { bytes: new Uint8Array(0) };
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  let passed: number | undefined;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (length + value.byteLength > limit) {
        chunks.push(value.subarray(0, limit - length));
        passed = length + value.byteLength;
        length = limit;
        await reader.cancel().catch(() => undefined);
        break;
      }
      chunks.push(value);
      length += value.byteLength;
    }
  } catch (cause) {
    throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `reading the reply failed: ${(cause as Error).message}`, { where, cause });
  } finally {
    reader.releaseLock();
  }
  const bytes = chunks.length === 1 ? chunks[0] : new Uint8Array(length);
  if (chunks.length !== 1) {
    let at = 0;
    for (const c of chunks) {
      bytes.set(c, at);
      at += c.byteLength;
    }
  }
  return { bytes, passed };
}

/** The whole body, refused with `tooLarge` as soon as it is known to be over `limit`. */
export async function readBody(res: Response, options: ReadBodyOptions): Promise<Uint8Array> {
  const declared = declaredLength(res);
  if (declared !== undefined && declared > options.limit) {
    await res.body?.cancel().catch(() => undefined);
    throw options.tooLarge(declared, true);
  }
  const { bytes, passed } = await readUpTo(res, options.limit, options.where);
  if (passed !== undefined) throw options.tooLarge(passed, false);
  return bytes;
}

/** The start of an error reply's body as text, for its code and message; the rest is not read. */
export async function readErrorText(res: Response, where: string): Promise<string> {
  try {
    return new TextDecoder().decode((await readUpTo(res, MAX_ERROR_REPLY_BYTES, where)).bytes);
  } catch {
    return ''; // the status says enough
  }
}

/** A JSON reply, at most `limit` bytes; over it, or not JSON, is TANDEM_EDGE_RESPONSE_INVALID. */
export async function readJson(res: Response, where: string, limit = MAX_JSON_REPLY_BYTES): Promise<unknown> {
  const bytes = await readBody(res, {
    limit,
    where,
    tooLarge: (n, declared) => new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the reply ${declared ? `declares ${n} bytes` : `passed ${limit} bytes`}, over the limit of ${limit} for JSON`, { where, details: { bytes: n, limit } }),
  });
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (cause) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the body is not JSON', { where, cause });
  }
}
