// The demo's dataset and the word lists it is generated from agree: every record tells one of
// its label's events, and every event is told (the privacy bench holds out whole events).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { EVENTS, eventOf } from '../../cli/demo-data/templates.ts';

const records = readFileSync(join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl'), 'utf8')
  .trim().split('\n').map((line) => JSON.parse(line) as { text: string; label: keyof typeof EVENTS });

test('every record of feelings.jsonl tells one of its label’s events, and every event is told', () => {
  assert.equal(records.length, 480);
  const told = new Set<string>();
  for (const r of records) {
    const event = eventOf(r.text);
    assert.ok(event !== undefined && EVENTS[r.label].includes(event), `${r.text} → ${r.label}`);
    told.add(event);
  }
  assert.equal(told.size, Object.values(EVENTS).flat().length);
  assert.equal(new Set(records.map((r) => r.text)).size, records.length, 'no text twice: a held-out record is never a copy of a training one');
});

test('eventOf reads the event after the name, and nothing from text that is not generated', () => {
  assert.equal(eventOf('Jack broke the blue cup in the garden. Jack felt'), 'broke the blue cup');
  assert.equal(eventOf('Zoe heard a loud bang in the dark at home. Zoe felt'), 'heard a loud bang in the dark');
  assert.equal(eventOf('The film broke the blue cup of my heart'), undefined);
  assert.equal(eventOf('broke the blue cup'), undefined);
});
