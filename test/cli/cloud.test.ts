import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { cloudCommand } from '../../cli/cloud.ts';
import type { CommandIo } from '../../cli/io.ts';
import { main } from '../../cli/main.ts';

const fixture = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
const dirs: string[] = [];
after(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

async function stateDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'tandem-cli-cloud-'));
  dirs.push(d);
  return d;
}

function capture(): { io: CommandIo; out: string[]; log: string[] } {
  const out: string[] = [];
  const log: string[] = [];
  return { io: { out: (l) => out.push(l), log: (l) => log.push(l) }, out, log };
}

describe('tandem keys create', () => {
  it('creates a key for a tenant, printed once and stored hashed in the state directory', async () => {
    const state = await stateDir();
    const { io, out } = capture();
    assert.equal(await main(['keys', 'create', '--tenant', 'alice', '--state', state, '--json'], io), 0);
    const created = JSON.parse(out.join('\n')) as { tenant: string; key: string };
    assert.equal(created.tenant, 'alice');
    assert.match(created.key, /^tdk_/);
    const file = await readFile(join(state, 'keys.json'), 'utf8');
    assert.ok(file.includes('"alice"') && !file.includes(created.key));
  });

  it('exits 2 with a stable code for a missing or invalid tenant', async () => {
    const state = await stateDir();
    const missing = capture();
    assert.equal(await main(['keys', 'create', '--state', state], missing.io), 2);
    assert.match(missing.log.join('\n'), /TANDEM_CLI_FLAG_MISSING/);
    const invalid = capture();
    assert.equal(await main(['keys', 'create', '--tenant', 'a b', '--state', state], invalid.io), 2);
    assert.match(invalid.log.join('\n'), /TANDEM_TENANT_INVALID/);
  });
});

describe('tandem cloud', () => {
  it('serves the model, prints the admin key on the first start only, and accepts keys made by `tandem keys create` while running', async () => {
    const state = await stateDir();
    for (const start of [1, 2]) {
      const { io, out } = capture();
      let stop!: () => void;
      const stopped = new Promise<void>((resolve) => { stop = resolve; });
      const running = cloudCommand(io, () => stopped).parseAsync(['--model', fixture, '--port', '0', '--state', state, '--backend', 'wasm', '--log-level', 'silent'], { from: 'user' });
      while (!out.some((l) => l.startsWith('tandem cloud listening on '))) await new Promise((resolve) => setTimeout(resolve, 10));
      const url = out[0].slice('tandem cloud listening on '.length);
      assert.equal(out.some((l) => l.startsWith('admin key')), start === 1);
      const made = capture();
      assert.equal(await main(['keys', 'create', '--tenant', `t${start}`, '--state', state], made.io), 0);
      const models = await fetch(`${url}/v1/models`, { headers: { authorization: `Bearer ${made.out[0]}` } });
      assert.equal(models.status, 200);
      stop();
      await running;
    }
  });

  it('rejects a bad flag with a stable code', async () => {
    const { io, log } = capture();
    assert.equal(await main(['cloud', '--model', fixture, '--port', 'eighty'], io), 2);
    assert.match(log.join('\n'), /TANDEM_CLI_FLAG_INVALID.*--port/);
  });

  it('refuses a worker engine other than ONNX Runtime\'s, before connecting to NATS', async () => {
    const { io, log } = capture();
    assert.equal(await main(['cloud', '--role', 'worker', '--nats', 'nats://127.0.0.1:1', '--model', fixture, '--engine', 'wasm'], io), 2);
    assert.match(log.join('\n'), /TANDEM_CLI_FLAG_INVALID.*--engine.*ort-cpu or ort-cuda/);
  });
});
