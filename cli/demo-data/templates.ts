// The word lists feelings.jsonl is generated from (generate.ts): each record is a name, one
// of the label's events and a place. The privacy bench holds out whole events for validation.

export const NAMES = ['Lily', 'Tom', 'Mia', 'Ben', 'Sue', 'Max', 'Anna', 'Tim', 'Lucy', 'Sam', 'Zoe', 'Jack'] as const;
export const PLACES = ['in the park', 'at home', 'in the garden', 'at school', 'by the lake', 'in the yard', 'at the beach', 'in the forest'] as const;
export const EVENTS: Readonly<Record<'happy' | 'sad' | 'scared', readonly string[]>> = {
  happy: ['found a shiny red ball', 'got a big hug from mom', 'ate a yummy cake', 'played with a new puppy', 'saw a pretty rainbow', 'won a fun race', 'got a new toy car', 'made a kind friend'],
  sad: ['lost the favorite teddy', 'broke the blue cup', 'dropped the ice cream', 'saw the flower die', 'had no one to play with', 'tore the best book', 'missed the old friend', 'could not find the kite'],
  scared: ['heard a loud bang in the dark', 'saw a big dog growl', 'got lost in the woods', 'saw a shadow move at night', 'heard thunder crash', 'saw a snake in the grass', 'fell into the cold water', 'heard a strange noise upstairs'],
};

/** The event a generated record's text tells ("Jack broke the blue cup in the garden. Jack felt" → "broke the blue cup"), if it is one of EVENTS. */
export function eventOf(text: string): string | undefined {
  const afterName = text.slice(text.indexOf(' ') + 1);
  return Object.values(EVENTS).flat().find((e) => afterName.startsWith(`${e} `));
}
