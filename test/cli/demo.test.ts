// `tandem demo --json`: a cloud node and an edge client on loopback, one JSON object out.
import assert from 'node:assert/strict';
import { it } from 'node:test';
import { main } from '../../cli/main.ts';

interface DemoJson {
  model: string;
  steps: number;
  before: { valLoss: number; accuracy: number };
  after: { valLoss: number; accuracy: number };
  wire: { codecs: unknown; bytesSent: number; bytesReceived: number; forwardMessages: number; backwardMessages: number; tokenIdsSent: number; cloudWaitSeconds: number };
  seconds: number;
}

it('tandem demo --json --steps 2 prints the before/after figures, better after, and what crossed the wire', async () => {
  const out: string[] = [];
  const code = await main(['demo', '--json', '--steps', '2'], { out: (l) => out.push(l), log: () => undefined });
  assert.equal(code, 0);
  assert.equal(out.length, 1);
  const r = JSON.parse(out[0]) as DemoJson;
  assert.equal(r.model, 'stories260K');
  assert.equal(r.steps, 2);
  for (const phase of ['before', 'after'] as const) {
    assert.ok(Number.isFinite(r[phase].valLoss), `${phase}.valLoss`);
    assert.ok(r[phase].accuracy >= 0 && r[phase].accuracy <= 1, `${phase}.accuracy`);
  }
  // Two steps of split fine-tuning already move the held-out stories' labels.
  assert.ok(r.after.accuracy > r.before.accuracy, `accuracy ${r.before.accuracy} → ${r.after.accuracy}`);
  assert.ok(r.after.valLoss < r.before.valLoss, `validation loss ${r.before.valLoss} → ${r.after.valLoss}`);
  assert.deepEqual(r.wire.codecs, { forward: 'int8-block', backward: 'f16' });
  assert.ok(r.wire.bytesSent > 0 && r.wire.bytesReceived > 0);
  assert.ok(r.wire.forwardMessages >= 2 && r.wire.backwardMessages === 2);
  assert.equal(r.wire.tokenIdsSent, 0);
  assert.ok(r.seconds > 0);
  assert.ok(r.wire.cloudWaitSeconds > 0 && r.wire.cloudWaitSeconds < r.seconds, `waited ${r.wire.cloudWaitSeconds} s of ${r.seconds}`);
});
