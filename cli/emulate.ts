import { Command } from 'commander';
import { DEFAULT_DISTILL_LAMBDA, DEFAULT_EMULATOR_CUT, QUANTIZATIONS, buildEmulator, describeFidelity } from '../emulator/index.ts';
import type { EmulateEvent, Quantization } from '../emulator/index.ts';
import { CliError } from './errors.ts';
import { ENGINE_FLAG_HELP, engineFlag, numberFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';
import { choice } from './recipe.ts';
import { intList } from './train.ts';

interface EmulateFlags {
  model?: string;
  modelId?: string;
  keep?: string;
  cut: string;
  distill?: string;
  steps?: string;
  lambda: string;
  lr: string;
  batchSize: string;
  seqLen: string;
  seed: string;
  eval?: string;
  evalRows: string;
  quantize?: string;
  out?: string;
  json?: boolean;
  backend?: string;
  engine?: string;
}

export function emulateCommand(io: CommandIo = processIo): Command {
  return new Command('emulate')
    .description('build an emulator bundle for offsite training: bottom and top blocks, a layer-dropped (optionally distilled, quantized) middle, tokenizer, manifest with a fidelity report and a checksum')
    .option('--model <dir>', 'Hugging Face model folder')
    .option('--model-id <id>', "the model's id in the manifest (default: the folder's name)")
    .option('--keep <K>', 'middle blocks the emulator keeps (uniform layer drop; the first and last always stay)')
    .option('--cut <B,T>', 'bottom and top blocks the data owner trains', `${DEFAULT_EMULATOR_CUT.bottom},${DEFAULT_EMULATOR_CUT.top}`)
    .option('--distill <file>', 'public text (.txt or .jsonl) to distill the kept blocks on')
    .option('--steps <n>', 'distillation steps (with --distill)')
    .option('--lambda <x>', 'weight of the normalized hidden-state MSE next to the LM loss', String(DEFAULT_DISTILL_LAMBDA))
    .option('--lr <x>', 'distillation learning rate (AdamW, cosine)', '1e-3')
    .option('--batch-size <n>', 'distillation rows per step', '8')
    .option('--seq-len <n>', 'tokens per row (distillation and fidelity)', '128')
    .option('--seed <n>', 'seed of the data split and order', '0')
    .option('--eval <file>', 'text for the fidelity report (default: the held-out tenth of --distill)')
    .option('--eval-rows <n>', 'rows the fidelity report uses at most', '64')
    .option('--quantize <kind>', `quantize the emulator's linear weights: ${QUANTIZATIONS.join(', ')}`)
    .option('--out <dir>', 'the bundle folder')
    .option('--json', 'print the manifest as JSON')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .option('--engine <name>', `${ENGINE_FLAG_HELP}; the kept blocks distill on tfjs`)
    .action(async (flags: EmulateFlags) => {
      const int = (flag: string, value: string | undefined, min: number) => numberFlag(flag, value, { min, integer: true });
      const cut = intList('--cut', flags.cut);
      if (cut.length !== 2) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--cut', `must be two integers B,T, got ${JSON.stringify(flags.cut)}`);
      if (flags.steps !== undefined && flags.distill === undefined) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--steps', 'needs --distill');
      const quantize = flags.quantize === undefined ? null : choice<Quantization>('--quantize', flags.quantize, QUANTIZATIONS, 'int8');
      const seqLen = int('--seq-len', flags.seqLen, 2);
      const report = (e: EmulateEvent) => {
        if (flags.json) return;
        if (e.type === 'start') io.log(`emulating ${e.model}: ${e.layers} blocks, cut (${e.cut.bottom}, ${e.cut.top}), keeping middle blocks ${e.kept.join(', ')}`);
        if (e.type === 'distill' && (e.step % 10 === 0 || e.step === e.steps)) io.log(`distill step ${e.step}/${e.steps}  loss ${e.loss.toFixed(4)}  LM ${e.lmLoss.toFixed(4)}  hidden ${e.kdLoss.toFixed(4)}`);
      };
      const manifest = await buildEmulator({
        modelDir: requiredFlag('--model', flags.model),
        modelId: flags.modelId,
        keep: int('--keep', requiredFlag('--keep', flags.keep), 1),
        cut: { bottom: cut[0], top: cut[1] },
        quantize,
        outDir: requiredFlag('--out', flags.out),
        evalRows: int('--eval-rows', flags.evalRows, 1),
        seqLen,
        backend: flags.backend,
        engine: engineFlag(flags),
        ...(flags.json ? {} : { log: io.log }),
        ...(flags.eval ? { evalFile: flags.eval } : {}),
        ...(flags.distill
          ? {
              distill: {
                dataFile: flags.distill,
                steps: int('--steps', requiredFlag('--steps', flags.steps), 1),
                lambda: numberFlag('--lambda', flags.lambda, { min: 0 }),
                lr: numberFlag('--lr', flags.lr, { min: Number.MIN_VALUE }),
                batchSize: int('--batch-size', flags.batchSize, 1),
                seed: numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true }),
              },
            }
          : {}),
        onEvent: report,
      });
      if (flags.json) io.out(JSON.stringify(manifest));
      else for (const line of describeFidelity(manifest)) io.out(line);
    });
}
