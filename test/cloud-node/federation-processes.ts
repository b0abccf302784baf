// Real processes for the federation tests: `tandem cloud` and `tandem edge federate` spawned
// from bin/tandem.js on loopback, their stdout read line by line, and the REST calls the tests make.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after } from 'node:test';
import { flatten } from '../../model/index.ts';
import { decodeFloat32 } from '../../protocol/index.ts';
import type { FederationStatus, WireAdapter } from '../../protocol/index.ts';

export const ROOT = resolve(import.meta.dirname, '..', '..');
export const STORIES = join(ROOT, 'test', 'fixtures', 'stories260K');
const BIN = join(ROOT, 'bin', 'tandem.js');
const children = new Set<ChildProcess>();
const dirs: string[] = [];
after(async () => {
  for (const c of children) c.kill('SIGKILL');
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

export interface Proc {
  child: ChildProcess;
  lines: string[];
  /** Resolves with the first stdout line matching. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<string>;
  exited: Promise<number | null>;
}

export function run(args: string[]): Proc {
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  const lines: string[] = [];
  const waiters: { re: RegExp; resolve: (l: string) => void }[] = [];
  let buf = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      lines.push(line);
      for (const w of [...waiters]) if (w.re.test(line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => {
    children.delete(child);
    r(code);
  }));
  return {
    child, lines, exited,
    waitFor: (re, timeoutMs = 120_000) => {
      const hit = lines.find((l) => re.test(l));
      if (hit) return Promise.resolve(hit);
      return new Promise((res, rej) => {
        const t = setTimeout(() => rej(new Error(`timed out waiting for ${re} from ${args.slice(0, 2).join(' ')}; stderr: ${err}`)), timeoutMs);
        waiters.push({ re, resolve: (l) => {
          clearTimeout(t);
          res(l);
        } });
        void exited.then((code) => rej(new Error(`process ${args.slice(0, 2).join(' ')} exited ${code} before ${re}; stderr: ${err}`)));
      });
    },
  };
}

export async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'tandem-fed-test-'));
  dirs.push(d);
  return d;
}

export interface Cloud {
  url: string;
  port: number;
  adminKey: string;
  proc: Proc;
}

export async function startCloud(stateDir: string, port = 0, adminKey = ''): Promise<Cloud> {
  const proc = run(['cloud', '--model', STORIES, '--state', stateDir, '--port', String(port), '--backend', 'wasm', '--log-level', 'silent']);
  const line = await proc.waitFor(/listening on/);
  const url = line.split('listening on ')[1].trim();
  if (!adminKey) adminKey = (await proc.waitFor(/admin key/)).split(': ').at(-1)!.trim();
  return { url, port: Number(new URL(url).port), adminKey, proc };
}

export async function api(cloud: Cloud, method: string, path: string, key: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${cloud.url}${path}`, { method, headers: { authorization: `Bearer ${key}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) }, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

export async function tenantKey(cloud: Cloud, tenant: string): Promise<string> {
  const { status, json } = await api(cloud, 'POST', '/v1/keys', cloud.adminKey, { tenant });
  assert.equal(status, 201, JSON.stringify(json));
  return json.key as string;
}

export async function status(cloud: Cloud, id: string): Promise<FederationStatus> {
  const { status: code, json } = await api(cloud, 'GET', `/v1/federations/${id}`, cloud.adminKey);
  assert.equal(code, 200, JSON.stringify(json));
  return json as unknown as FederationStatus;
}

export async function until<T>(f: () => Promise<T | undefined>, what: string, timeoutMs = 120_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A wire adapter's values, flat in sorted-key order (the federation's layout). */
export function flatOf(adapter: WireAdapter): Float32Array {
  return flatten(Object.fromEntries(Object.entries(adapter.tensors).map(([k, t]) => [k, { shape: t.shape, data: decodeFloat32(t.data)! }])));
}

