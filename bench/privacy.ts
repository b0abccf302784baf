// What an honest-but-curious cloud learns, measured on stories260K (5 blocks, T = 1): token
// recovery from h_B (best of nearest-neighbour and the learned linear inversion) and label
// leakage from g_M (norm and direction attacks, AUC) for B = 1, 2, 3, each defense off and on,
// on the demo's label data (cli/demo-data/feelings.jsonl) and on tinyshakespeare (no labels).
// `validationLossCost` is the relative rise of the base model's validation loss when h_B
// carries the defense's noise (forward only, no training; the label defenses change no forward,
// so their cost there is 0 and their training cost is not measured here).
//
//   npm run bench -- privacy [--quick] [--data PATH]
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { LlamaModel, chooseDefenses, describeDefenses, initBackend, labelBatch, loadModelFolder, loadTokenizer, measureAttacks, parseDataset, streamRows, tokenStream } from '../model/index.ts';
import type { AttackFigures, Defenses, MeasureInput } from '../model/index.ts';

const root = join(import.meta.dirname, '..');
const fixture = join(root, 'test', 'fixtures', 'stories260K');

function flag(args: string[], name: string, fallback: string): string {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

interface Row {
  data: string;
  bottom: number;
  defense: string;
  tokenRecovery: number;
  nearestNeighbourRecovery: number;
  learnedRecovery: number;
  labelLeakAucNorm: number | null;
  labelLeakAucDirection: number | null;
  validationLossCost: number;
}

function row(data: string, cutBottom: number, name: string, f: AttackFigures): Row {
  return {
    data,
    bottom: cutBottom,
    defense: name === f.defenses ? name : `${name} (${f.defenses})`,
    tokenRecovery: f.tokenRecovery,
    nearestNeighbourRecovery: f.nearestNeighbourRecovery,
    learnedRecovery: f.learnedRecovery,
    labelLeakAucNorm: f.labelLeakAucNorm ?? null,
    labelLeakAucDirection: f.labelLeakAucDirection ?? null,
    validationLossCost: f.forwardLossCost,
  };
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const shakespeare = flag(args, '--data', join(root, '..', 'shared', 'fixtures', 'data', 'tinyshakespeare', 'input.txt'));
  await initBackend({});
  const loaded = await loadModelFolder(fixture);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const tokenizer = await loadTokenizer(fixture);
  const seqLen = 16;
  const rowsAttacked = quick ? 1 : 4;
  const sets = [
    { name: 'feelings', dataset: parseDataset(readFileSync(join(root, 'cli', 'demo-data', 'feelings.jsonl'), 'utf8'), 'feelings.jsonl') },
    { name: 'tinyshakespeare', dataset: parseDataset(readFileSync(shakespeare, 'utf8').slice(0, quick ? 20_000 : 60_000), 'input.txt') },
  ];
  const rows: Row[] = [];
  const started = performance.now();
  for (const set of sets) {
    const stream = tokenStream(set.dataset, tokenizer);
    const attacked = streamRows(stream, seqLen, rowsAttacked);
    const publicRows = streamRows(stream.slice(rowsAttacked * seqLen), seqLen, quick ? 64 : 256);
    const labels = labelBatch(set.dataset, tokenizer, quick ? 48 : 160, 64);
    for (const bottom of [1, 2, 3]) {
      const input: MeasureInput = { model, rows: attacked, publicRows, labels, cut: { bottom, top: 1 }, microbatch: 8, seed: 0 };
      const defenses: [string, Defenses][] = [
        ['none', {}],
        ['noise', { noise: { sigma: 1, clip: 0 } }],
        ['max-norm', { maxNorm: true }],
        ['gradient-noise', { maxNorm: true, gradientNoise: { rho: 4 } }],
      ];
      if (bottom + 2 <= model.numLayers - 1) defenses.push(['deeper-bottom', { deeperBottom: 1 }]);
      let undefended: AttackFigures | undefined;
      const first = rows.length;
      for (const [name, d] of defenses) {
        if (!labels && (name === 'max-norm' || name === 'gradient-noise')) continue;
        const f = measureAttacks(input, d);
        undefended ??= f;
        rows.push(row(set.name, bottom, name, f));
      }
      const auto = chooseDefenses(input, undefended as AttackFigures);
      rows.push(row(set.name, bottom, 'auto', auto.figures));
      for (const r of rows.slice(first)) {
        const pct = (x: number) => `${(100 * x).toFixed(1)}%`.padStart(6);
        const auc = (x: number | null) => (x === null ? '   -  ' : x.toFixed(3).padStart(6));
        process.stdout.write(`${r.data.padEnd(16)} B=${r.bottom}  ${r.defense.padEnd(52)} recovery ${pct(r.tokenRecovery)}  AUC norm ${auc(r.labelLeakAucNorm)} direction ${auc(r.labelLeakAucDirection)}  loss cost ${pct(r.validationLossCost)}\n`);
      }
      process.stdout.write(`  (auto chose ${describeDefenses(auto.defenses)})\n`);
    }
  }
  model.dispose();
  return { model: 'stories260K', top: 1, seqLen, rowsAttacked, quick, seconds: (performance.now() - started) / 1000, rows };
}
