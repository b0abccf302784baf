// The gateway's directory of workers takes announcements from anyone holding the worker
// password: forged ones (found by fuzzing: 200,000 ids held 120 MiB) stop at MAX_KNOWN_WORKERS.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { connectNats } from '../../cloud-node/cluster/nats-connection.ts';
import { MAX_KNOWN_WORKERS, WorkerDirectory } from '../../cloud-node/cluster/worker-directory.ts';
import { ANNOUNCE_SUBJECT } from '../../cloud-node/cluster/wire.ts';
import { startNatsServer } from './nats-server.ts';
import type { TestNatsServer } from './nats-server.ts';

describe('the worker directory', () => {
  let nats: TestNatsServer;
  before(async () => {
    nats = await startNatsServer();
  });
  after(async () => {
    await nats?.close();
  });

  it('knows at most MAX_KNOWN_WORKERS workers, however many ids are announced', async () => {
    const gateway = await connectNats(nats.url, 'test-directory-gateway', 'gateway');
    const worker = await connectNats(nats.url, 'test-directory-worker', 'worker');
    const directory = new WorkerDirectory(gateway, 'sha256:00');
    try {
      await gateway.flush(); // the directory's subscription is in place
      const announce = (id: string): void => worker.publish(ANNOUNCE_SUBJECT, JSON.stringify({ id, model: 'm', contentHash: 'sha256:00', blocks: { start: 0, end: 2 }, load: {} }));
      for (let i = 0; i < MAX_KNOWN_WORKERS + 500; i++) announce(`forged-${i}`);
      await worker.flush();
      // Every announcement has arrived once one sent after them has.
      const last = new Promise<void>((resolve) => gateway.subscribe(ANNOUNCE_SUBJECT, { callback: (_e, m) => { if (m.string().includes('"marker"')) resolve(); } }));
      await gateway.flush();
      announce('marker');
      await last;
      const known = await directory.workers();
      assert.equal(known.length, MAX_KNOWN_WORKERS);
      assert.ok(!known.some((w) => w.id === `forged-${MAX_KNOWN_WORKERS + 499}`), 'the ids past the limit were not taken');
    } finally {
      directory.close();
      await worker.close();
      await gateway.close();
    }
  });
});
