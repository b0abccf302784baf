// Writes feelings.jsonl: the demo's private dataset, generated here from the word lists
// below with a fixed seed (see README.md). Run: node --import tsx cli/demo-data/generate.ts
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from '../../model/index.ts';

const NAMES = ['Lily', 'Tom', 'Mia', 'Ben', 'Sue', 'Max', 'Anna', 'Tim', 'Lucy', 'Sam', 'Zoe', 'Jack'];
const PLACES = ['in the park', 'at home', 'in the garden', 'at school', 'by the lake', 'in the yard', 'at the beach', 'in the forest'];
const EVENTS: Record<string, string[]> = {
  happy: ['found a shiny red ball', 'got a big hug from mom', 'ate a yummy cake', 'played with a new puppy', 'saw a pretty rainbow', 'won a fun race', 'got a new toy car', 'made a kind friend'],
  sad: ['lost the favorite teddy', 'broke the blue cup', 'dropped the ice cream', 'saw the flower die', 'had no one to play with', 'tore the best book', 'missed the old friend', 'could not find the kite'],
  scared: ['heard a loud bang in the dark', 'saw a big dog growl', 'got lost in the woods', 'saw a shadow move at night', 'heard thunder crash', 'saw a snake in the grass', 'fell into the cold water', 'heard a strange noise upstairs'],
};

const rng = new Rng(20261128);
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng.next() * xs.length)];
const lines: string[] = [];
for (let i = 0; i < 480; i++) {
  const label = (['happy', 'sad', 'scared'] as const)[i % 3];
  const name = pick(NAMES);
  const text = `${name} ${pick(EVENTS[label])} ${pick(PLACES)}. ${name} felt`;
  lines.push(JSON.stringify({ text, label }));
}
writeFileSync(join(import.meta.dirname, 'feelings.jsonl'), `${lines.join('\n')}\n`);
