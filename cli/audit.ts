import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Command } from 'commander';
import { OFFSITE_ADAPTER_DIR, OFFSITE_MODEL_DIR, OFFSITE_RUN_DIR } from '../edge-client/index.ts';
import { ADAPTER_DIR, evaluateLocal, parseDefenses, runAudit } from '../model/index.ts';
import type { AttackFigures, EvaluationReport } from '../model/index.ts';
import { DEFAULT_CUT } from '../protocol/index.ts';
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
  offsite?: string;
  json?: boolean;
  backend?: string;
}

function line(f: AttackFigures): string {
  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  const label = f.labelLeakAucNorm === undefined ? '' : `  label AUC norm ${f.labelLeakAucNorm.toFixed(3)} direction ${(f.labelLeakAucDirection ?? 0).toFixed(3)}`;
  return `${f.defenses.padEnd(36)} B=${f.bottom}  token recovery ${pct(f.tokenRecovery)} (nearest ${pct(f.nearestNeighbourRecovery)}, learned ${pct(f.learnedRecovery)} of ${f.tokensAttacked})${label}  loss cost ${pct(f.forwardLossCost)}`;
}

export interface OffsiteFigures {
  fullZeroShot: EvaluationReport;
  emulatorZeroShot: EvaluationReport;
  /** The adapter on the emulator alone: what the data owner gets without the full model. */
  emulatorFineTuned: EvaluationReport;
  /** The same adapter plugged into the full model. */
  plugIn: EvaluationReport;
}

/** The model owner's side of offsite mode, on the audit's data: how close the emulator is to the full model, and how far the adapter gets with the emulator alone. */
async function offsiteFigures(modelDir: string, outDir: string, dataFile: string, backend: string | undefined): Promise<OffsiteFigures> {
  const emulated = join(outDir, OFFSITE_MODEL_DIR);
  const evaluate = (m: string, adapterDir?: string) => evaluateLocal({ modelDir: m, dataFile, seqLen: 64, batchSize: 8, backend, ...(adapterDir ? { adapterDir } : {}) });
  return {
    fullZeroShot: await evaluate(modelDir),
    emulatorZeroShot: await evaluate(emulated),
    emulatorFineTuned: await evaluate(emulated, join(outDir, OFFSITE_RUN_DIR, ADAPTER_DIR)),
    plugIn: await evaluate(modelDir, join(outDir, OFFSITE_ADAPTER_DIR)),
  };
}

export function auditCommand(io: CommandIo = processIo): Command {
  return new Command('audit')
    .description('attack your own data as an honest-but-curious cloud would (token inversion from h_B, label leakage from g_M), with and without defenses')
    .option('--model <dir>', 'Hugging Face model folder (the frozen base the cloud holds)')
    .option('--data <file>', 'the private data: .jsonl or .txt; {"text","label"} data adds the label-leak attacks')
    .option('--public <file>', 'public text the attacker trains its inversion on (default: the rest of --data, a stronger attacker)')
    .option('--cut <B,T>', 'bottom and top blocks on the edge', `${DEFAULT_CUT.bottom},${DEFAULT_CUT.top}`)
    .option('--defense <list>', 'none, auto, or a comma list of noise[:SIGMA[:CLIP]], noise-spread[:SIGMA[:CLIP]], deeper-bottom[:K], max-norm, gradient-noise[:RHO], nopeek[:ALPHA], marvell[:S]')
    .option('--rows <n>', 'rows attacked by inversion', '8')
    .option('--seq-len <n>', 'tokens per inverted row', '16')
    .option('--label-examples <n>', 'classification examples whose gradients are attacked', '128')
    .option('--microbatch <n>', 'examples per micro-batch (the label defenses work per micro-batch)', '8')
    .option('--seed <n>', 'seed of the noise', '0')
    .option('--offsite <dir>', 'the folder `tandem edge offsite` wrote: adds the emulator against the full model, and the adapter on the emulator alone against the plug-in')
    .option('--json', 'print one JSON object')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .action(async (flags: AuditFlags) => {
      const int = (flag: string, value: string) => numberFlag(flag, value, { min: 0, integer: true });
      const cut = intList('--cut', flags.cut);
      if (cut.length !== 2) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--cut', `must be two integers B,T, got ${JSON.stringify(flags.cut)}`);
      const defenses = flags.defense === undefined ? undefined : parseDefenses(flags.defense);
      if (flags.offsite !== undefined) {
        const need = [join(flags.offsite, OFFSITE_MODEL_DIR), join(flags.offsite, OFFSITE_RUN_DIR, ADAPTER_DIR), join(flags.offsite, OFFSITE_ADAPTER_DIR)];
        for (const dir of need) {
          if (!(await stat(dir).then((s) => s.isDirectory(), () => false))) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--offsite', `needs the folder \`tandem edge offsite\` wrote; ${dir} is missing`);
        }
      }
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
      const offsite = flags.offsite ? await offsiteFigures(report.model, flags.offsite, report.data, flags.backend) : undefined;
      if (flags.json) {
        io.out(JSON.stringify(offsite ? { ...report, offsite } : report));
        return;
      }
      io.out(`audit of ${report.data} against ${report.model}, cut (${report.cut.bottom}, ${report.cut.top})`);
      io.out(line(report.undefended));
      if (report.defended) io.out(line(report.defended));
      if (report.autoChosen) io.out(`auto chose: ${report.autoChosen}`);
      if (offsite) {
        const ppl = (e: EvaluationReport) => e.perplexity.toFixed(2);
        io.out(`offsite: perplexity full ${ppl(offsite.fullZeroShot)}, emulator ${ppl(offsite.emulatorZeroShot)}; adapter on the emulator alone ${ppl(offsite.emulatorFineTuned)}, plugged into the full model ${ppl(offsite.plugIn)}`);
      }
    });
}
