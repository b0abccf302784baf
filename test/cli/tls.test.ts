// TLS end to end: `tandem cloud --tls-cert --tls-key` serves HTTPS and WSS on one port,
// `tandem edge train --ca` trains against it, and a certificate from another CA is refused
// with a typed error naming the URL.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cloudCommand } from '../../cli/cloud.ts';
import type { CommandIo } from '../../cli/io.ts';
import { main } from '../../cli/main.ts';
import { DISCONNECT_REASON_EVENT as CLOUD_EVENT } from '../../cloud-node/index.ts';
import { DISCONNECT_REASON_EVENT as EDGE_EVENT } from '../../edge-client/connection.ts';
import { CloudRest, EdgeError, connectCloud } from '../../edge-client/index.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const data = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');

let work: string;
let url: string;
let adminKey: string;
let stop: () => void;
let running: Promise<unknown>;

function capture(): { io: CommandIo; out: string[]; log: string[] } {
  const out: string[] = [];
  const log: string[] = [];
  return { io: { out: (l) => out.push(l), log: (l) => log.push(l) }, out, log };
}

const openssl = (...args: string[]): void => {
  execFileSync('openssl', args, { cwd: work, stdio: 'pipe' });
};

/** A CA (key + self-signed certificate) in `name`.key / `name`.pem. */
function makeCa(name: string): void {
  openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '2', '-subj', `/CN=${name}`);
}

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'tandem-tls-'));
  makeCa('ca');
  makeCa('other-ca');
  // The server certificate, signed by `ca`, for 127.0.0.1 and localhost.
  openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
  await writeFile(join(work, 'san.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'server.pem', '-days', '2', '-extfile', 'san.ext');

  const { io, out } = capture();
  let resolveStop!: () => void;
  const stopped = new Promise<void>((resolve) => { resolveStop = resolve; });
  stop = resolveStop;
  running = cloudCommand(io, () => stopped).parseAsync([
    '--model', fixture, '--port', '0', '--state', join(work, 'state'), '--backend', 'wasm', '--log-level', 'silent',
    '--tls-cert', join(work, 'server.pem'), '--tls-key', join(work, 'server.key'),
  ], { from: 'user' });
  running.catch(() => undefined);
  while (!out.some((l) => l.startsWith('admin key'))) await new Promise((resolve) => setTimeout(resolve, 10));
  url = out.find((l) => l.startsWith('tandem cloud listening on '))!.slice('tandem cloud listening on '.length);
  adminKey = out.find((l) => l.startsWith('admin key'))!.replace(/^.*: /, '');
});

after(async () => {
  stop?.();
  await running;
  await rm(work, { recursive: true, force: true });
});

describe('TLS on the node\'s own port', () => {
  it('serves https:// and trains `tandem edge train --ca` against it over WSS', async () => {
    assert.match(url, /^https:\/\/127\.0\.0\.1:\d+$/);
    const tenant = capture();
    assert.equal(await main(['keys', 'create', '--tenant', 'alice', '--state', join(work, 'state')], tenant.io), 0);
    const { io, out, log } = capture();
    const code = await main([
      'edge', 'train', '--cloud', url, '--key', tenant.out[0], '--ca', join(work, 'ca.pem'), '--model', 'stories260K', '--data', data,
      '--steps', '2', '--batch-size', '2', '--seq-len', '16', '--cache', join(work, 'cache'), '--json', '--backend', 'wasm',
      // Ten held-out rows: the before/after evaluation is not what this test is about.
      '--val-fraction', '0.02',
    ], io);
    assert.equal(code, 0, log.join('\n'));
    const summary = JSON.parse(out.at(-1)!) as { steps: number; finalLoss: number; wire: { bytesSent: number } };
    assert.equal(summary.steps, 2);
    assert.ok(Number.isFinite(summary.finalLoss));
    assert.ok(summary.wire.bytesSent > 0, 'activations crossed the WSS data plane');
  });

  it('refuses a certificate from another CA with TANDEM_EDGE_TLS_UNTRUSTED naming the URL, on REST and on the socket', async () => {
    const otherCa = await import('node:fs/promises').then((fs) => fs.readFile(join(work, 'other-ca.pem'), 'utf8'));
    await assert.rejects(new CloudRest(url, adminKey, 10_000, otherCa).models(), (e: unknown) => e instanceof EdgeError && e.code === 'TANDEM_EDGE_TLS_UNTRUSTED' && e.message.includes(url));
    await assert.rejects(connectCloud(url, { key: adminKey, ca: otherCa, connectTimeoutMs: 20_000 }), (e: unknown) => e instanceof EdgeError && e.code === 'TANDEM_EDGE_TLS_UNTRUSTED' && e.message.includes(url));
    // No --ca at all: the system's CAs do not know this one either.
    const { io, log } = capture();
    const code = await main([
      'edge', 'train', '--cloud', url, '--key', adminKey, '--model', 'stories260K', '--data', data, '--steps', '1', '--cache', join(work, 'cache2'), '--backend', 'wasm',
    ], io);
    assert.equal(code, 2);
    assert.match(log.join('\n'), /TANDEM_EDGE_TLS_UNTRUSTED/);
    assert.ok(log.join('\n').includes(url), 'the error names the URL');
    // The node is still up and ready after the refused handshakes.
    const ready = await new CloudRest(url, adminKey, 10_000, await import('node:fs/promises').then((fs) => fs.readFile(join(work, 'ca.pem'), 'utf8'))).models();
    assert.equal(ready[0].id, 'stories260K');
  });

  it('rejects --tls-cert without --tls-key, and a file that is not PEM, before starting', async () => {
    const missing = capture();
    assert.equal(await main(['cloud', '--model', fixture, '--tls-cert', join(work, 'server.pem')], missing.io), 2);
    assert.match(missing.log.join('\n'), /TANDEM_CLI_FLAG_MISSING.*--tls-key/);
    const notPem = capture();
    assert.equal(await main(['cloud', '--model', fixture, '--tls-cert', join(work, 'san.ext'), '--tls-key', join(work, 'server.key')], notPem.io), 2);
    assert.match(notPem.log.join('\n'), /TANDEM_CLI_FLAG_INVALID.*--tls-cert.*not PEM/);
  });

  it('names the disconnect event the same on both sides', () => {
    assert.equal(EDGE_EVENT, CLOUD_EVENT);
  });
});
