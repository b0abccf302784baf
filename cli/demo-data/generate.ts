// Writes feelings.jsonl: the demo's private dataset, generated from the word lists in
// templates.ts with a fixed seed (see README.md). Run: node --import tsx cli/demo-data/generate.ts
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from '../../model/index.ts';
import { EVENTS, NAMES, PLACES } from './templates.ts';

const rng = new Rng(20261128);
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng.next() * xs.length)];
// No two records alike: a held-out record is never a copy of a training one (its event and
// words are, by design; its name and place together are not). A repeat is drawn again.
const lines: string[] = [];
const seen = new Set<string>();
while (lines.length < 480) {
  const label = (['happy', 'sad', 'scared'] as const)[lines.length % 3];
  const name = pick(NAMES);
  const text = `${name} ${pick(EVENTS[label])} ${pick(PLACES)}. ${name} felt`;
  if (seen.has(text)) continue;
  seen.add(text);
  lines.push(JSON.stringify({ text, label }));
}
writeFileSync(join(import.meta.dirname, 'feelings.jsonl'), `${lines.join('\n')}\n`);
