// A gateway that fails to start after it connected to NATS (here: its state directory holds a
// file where the served adapters' folder belongs) must close what it opened — the connection,
// the key and session watches — so that `tandem cloud` reports the error and exits. An ordered
// JetStream consumer's idle-heartbeat monitor is a 30 s interval that is not unref'd: one left
// behind keeps the process alive for ever.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';
import { BIN, FIXTURE, tempDir } from './helpers.ts';

describe('a gateway whose start fails after connecting to NATS', () => {
  let nats: TestNatsServer;
  let state: { dir: string; remove(): Promise<void> };
  before(async () => {
    nats = await startNatsServer();
    state = await tempDir('watch-lifetime');
  });
  after(async () => {
    await nats.close();
    await state.remove();
  });

  it('reports the error and exits by itself', async () => {
    await mkdir(join(state.dir, 'serving'), { recursive: true });
    await writeFile(join(state.dir, 'serving', 'adapters'), 'not a folder');
    const child = spawn(process.execPath, [BIN, 'cloud', '--role', 'gateway', '--nats', nats.url, '--model', FIXTURE, '--backend', 'wasm', '--port', '0', '--state', state.dir, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    // A watch left running would keep the child alive for ever; 60 s is far above its start on a loaded machine.
    const killer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const [code, signal] = await once(child, 'exit') as [number | null, NodeJS.Signals | null];
    clearTimeout(killer);
    assert.equal(signal, null, `the gateway exited by itself, not killed: nothing it opened kept it alive\n${out.slice(-2000)}`);
    assert.notEqual(code, 0, 'a start that failed exits non-zero');
    assert.match(out, /EEXIST|ENOTDIR|not a directory|file already exists/i, 'the cause is reported');
  });
});
