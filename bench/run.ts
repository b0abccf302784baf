// `npm run bench -- NAME [flags]`: runs bench/NAME.ts, which prints its figures, and writes
// what it returns to bench/results/NAME.json with the machine it ran on.
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const names = readdirSync(here)
  .filter((f) => f.endsWith('.ts') && f !== 'run.ts' && !f.startsWith('_'))
  .map((f) => f.slice(0, -3));
const name = process.argv[2];
if (!name || !names.includes(name)) {
  process.stderr.write(`usage: npm run bench -- NAME [flags]\nbenchmarks: ${names.join(', ')}\n`);
  process.exit(2);
}
const bench = (await import(`./${name}.ts`)) as { run(args: string[]): Promise<Record<string, unknown>> };
const started = new Date().toISOString();
const figures = await bench.run(process.argv.slice(3));
const result = { bench: name, started, node: process.version, cpu: cpus()[0]?.model, cores: cpus().length, memoryBytes: totalmem(), ...figures };
mkdirSync(join(here, 'results'), { recursive: true });
const out = join(here, 'results', `${name}.json`);
writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
process.stdout.write(`wrote ${out}\n`);
