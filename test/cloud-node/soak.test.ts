// The soak bench for 60 seconds (issue 9): two good tenants' 20 sessions step while a third
// tenant sends every kind of hostile input; no good step fails and the node ends up ready.
// Timings are printed by `npm run bench -- soak`, never asserted.
import assert from 'node:assert/strict';
import { it } from 'node:test';
import { run } from '../../bench/soak.ts';

it('60 s of hostile input: zero failed good steps, the node ready at the end, every attack answered', async () => {
  const figures = await run(['--seconds', '60']);
  assert.equal(figures.goodStepsFailed, 0, JSON.stringify(figures.goodFailures));
  assert.ok((figures.goodSteps as number) > 0);
  assert.equal(figures.readyAtEnd, true);
  assert.ok((figures.stepsWithHostile as number) > 0, 'good tenants stepped while the hostile one attacked');
  const answers = figures.hostileAnswers as Record<string, Record<string, number>>;
  assert.deepEqual(Object.keys(answers['inflated top-k shape'] ?? {}), ['TANDEM_MICROBATCH_TOO_LARGE']);
  assert.deepEqual(Object.keys(answers['tiny max_message_bytes'] ?? {}), ['TANDEM_PROTO_FIELD_INVALID']);
  // A REST attack may also meet the tenant's request rate limit (the REST flood spends it).
  const adapterAnswers = Object.keys(answers['adapter with a huge rank'] ?? {});
  assert.ok(adapterAnswers.includes('400 TANDEM_ADAPTER_TOO_LARGE'), adapterAnswers.join(', '));
  assert.deepEqual(adapterAnswers.filter((a) => a !== '400 TANDEM_ADAPTER_TOO_LARGE' && a !== '429 TANDEM_QUOTA_EXCEEDED'), []);
  assert.deepEqual(Object.keys(answers['too many sessions (50 Hellos)'] ?? {}), ['TANDEM_QUOTA_EXCEEDED']);
  assert.deepEqual(Object.keys(answers['huge Hello strings (256 KiB client build)'] ?? {}), ['TANDEM_FIELD_TOO_LONG']);
});
