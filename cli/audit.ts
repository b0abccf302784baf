import { Command } from 'commander';
import { parseDefenses, runAudit } from '../model/index.ts';
import type { AttackFigures } from '../model/index.ts';
import { CliError } from './errors.ts';
import { numberFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';
import { intList } from './train.ts';

interface AuditFlags {
  model?: string;
  data?: string;
  public?: string;
  cut: string;
  defense?: string;
  rows: string;
  seqLen: string;
  labelExamples: string;
  microbatch: string;
  seed: string;
  json?: boolean;
  backend?: string;
}

function line(f: AttackFigures): string {
  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  const label = f.labelLeakAucNorm === undefined ? '' : `  label AUC norm ${f.labelLeakAucNorm.toFixed(3)} direction ${(f.labelLeakAucDirection ?? 0).toFixed(3)}`;
  return `${f.defenses.padEnd(36)} B=${f.bottom}  token recovery ${pct(f.tokenRecovery)} (nearest ${pct(f.nearestNeighbourRecovery)}, learned ${pct(f.learnedRecovery)} of ${f.tokensAttacked})${label}  loss cost ${pct(f.forwardLossCost)}`;
}

export function auditCommand(io: CommandIo = processIo): Command {
  return new Command('audit')
    .description('attack your own data as an honest-but-curious cloud would (token inversion from h_B, label leakage from g_M), with and without defenses')
    .option('--model <dir>', 'Hugging Face model folder (the frozen base the cloud holds)')
    .option('--data <file>', 'the private data: .jsonl or .txt; {"text","label"} data adds the label-leak attacks')
    .option('--public <file>', 'public text the attacker trains its inversion on (default: the rest of --data, a stronger attacker)')
    .option('--cut <B,T>', 'bottom and top blocks on the edge', '2,2')
    .option('--defense <list>', 'none, auto, or a comma list of noise[:SIGMA[:CLIP]], deeper-bottom[:K], max-norm, gradient-noise[:RHO]')
    .option('--rows <n>', 'rows attacked by inversion', '8')
    .option('--seq-len <n>', 'tokens per inverted row', '16')
    .option('--label-examples <n>', 'classification examples whose gradients are attacked', '128')
    .option('--microbatch <n>', 'examples per micro-batch (the label defenses work per micro-batch)', '8')
    .option('--seed <n>', 'seed of the noise', '0')
    .option('--json', 'print one JSON object')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .action(async (flags: AuditFlags) => {
      const int = (flag: string, value: string) => numberFlag(flag, value, { min: 0, integer: true });
      const cut = intList('--cut', flags.cut);
      if (cut.length !== 2) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--cut', `must be two integers B,T, got ${JSON.stringify(flags.cut)}`);
      const defenses = flags.defense === undefined ? undefined : parseDefenses(flags.defense);
      const report = await runAudit({
        modelDir: requiredFlag('--model', flags.model),
        dataFile: requiredFlag('--data', flags.data),
        cut: { bottom: cut[0], top: cut[1] },
        rows: int('--rows', flags.rows),
        seqLen: int('--seq-len', flags.seqLen),
        labelExamples: int('--label-examples', flags.labelExamples),
        microbatch: int('--microbatch', flags.microbatch),
        seed: int('--seed', flags.seed),
        backend: flags.backend,
        ...(flags.public ? { publicFile: flags.public } : {}),
        ...(defenses === undefined ? {} : { defenses }),
      });
      if (flags.json) {
        io.out(JSON.stringify(report));
        return;
      }
      io.out(`audit of ${report.data} against ${report.model}, cut (${report.cut.bottom}, ${report.cut.top})`);
      io.out(line(report.undefended));
      if (report.defended) io.out(line(report.defended));
      if (report.autoChosen) io.out(`auto chose: ${report.autoChosen}`);
    });
}
