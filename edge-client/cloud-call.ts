// REST calls from the edge to the cloud's /v1 routes that upload and federate share: the key,
// a private CA, the timeout, and the cloud's errors turned into EdgeErrors.
import { readErrorText } from './reply-body.ts';
import { cloudFetch } from './download.ts';
import { EdgeError } from './errors.ts';

export interface CloudTarget {
  /** http(s)://host:port of the node. */
  cloudUrl: string;
  key: string;
  /** PEM CA certificate(s) for an https:// cloud with a private CA. */
  ca?: string;
}

/** The URL of `path` on the cloud (the base URL without its trailing slashes). */
export function cloudUrl(target: CloudTarget, path: string): string {
  return `${target.cloudUrl.replace(/\/+$/, '')}${path}`;
}

/**
 * One REST call to the cloud with the tenant's key: JSON body in, the Response out when it is
 * ok; otherwise the typed EdgeError (auth, the cloud's stable code kept in remoteCode, or HTTP).
 */
export async function call(target: CloudTarget, method: string, path: string, body?: unknown, timeoutMs = 30 * 60_000): Promise<Response> {
  const url = cloudUrl(target, path);
  let response: Response;
  try {
    response = await cloudFetch(url, {
      method,
      headers: { authorization: `Bearer ${target.key}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      timeoutMs,
      ca: target.ca,
    });
  } catch (cause) {
    if (cause instanceof EdgeError) throw cause;
    throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `${method} failed: ${(cause as Error).message}`, { where: url, cause });
  }
  if (response.ok) return response;
  const text = await readErrorText(response, url);
  let remoteCode: string | undefined;
  let message = text.slice(0, 200);
  try {
    const json = JSON.parse(text) as { code?: unknown; message?: unknown };
    if (typeof json.code === 'string') remoteCode = json.code;
    if (typeof json.message === 'string') message = json.message;
  } catch {
    // not JSON: the status says enough
  }
  const details = { status: response.status };
  if (response.status === 401 || response.status === 403) throw new EdgeError('TANDEM_EDGE_AUTH_FAILED', `the cloud answered ${response.status}: ${message}`, { where: url, remoteCode, details });
  // A refusal keeps the cloud's stable code (TANDEM_ADAPTER_BASE_MISMATCH, TANDEM_EMULATOR_KEEP_INVALID, ...).
  if (remoteCode !== undefined) throw new EdgeError('TANDEM_EDGE_REMOTE_ERROR', `the cloud answered ${response.status}: ${message}`, { where: url, remoteCode, details });
  throw new EdgeError('TANDEM_EDGE_HTTP_FAILED', `the cloud answered ${response.status}: ${message}`, { where: url, details });
}

