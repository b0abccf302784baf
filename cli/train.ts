import { Command } from 'commander';
import { trainLocal } from '../model/index.ts';
import type { MethodSpec, TrainEvent } from '../model/index.ts';
import { CliError } from './errors.ts';
import { ENGINE_FLAG_HELP, engineFlag, numberFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';
import { addRecipeOptions, recipeFromFlags } from './recipe.ts';
import type { RecipeFlags } from './recipe.ts';

interface TrainFlags extends RecipeFlags {
  model?: string;
  data?: string;
  method?: string;
  r?: string;
  loraAlpha?: string;
  loraDropout?: string;
  targetModules?: string;
  layers?: string;
  numVirtualTokens?: string;
  out?: string;
  cut?: string;
  engine?: string;
}

export function intList(flag: string, value: string): number[] {
  return value.split(',').map((part) => numberFlag(flag, part.trim(), { min: 0, integer: true }));
}

/** The flags that make a method spec. */
export type MethodFlags = Pick<TrainFlags, 'method' | 'r' | 'loraAlpha' | 'loraDropout' | 'targetModules' | 'layers' | 'numVirtualTokens'>;

/** The method spec from the method flags given; fields not given keep the method's defaults, and fields the method lacks are its error. */
export function methodSpec(flags: MethodFlags): MethodSpec {
  const spec: MethodSpec = { method: requiredFlag('--method', flags.method) };
  if (flags.r !== undefined) spec.r = numberFlag('--r', flags.r, { min: 1, integer: true });
  if (flags.loraAlpha !== undefined) spec.loraAlpha = numberFlag('--lora-alpha', flags.loraAlpha, { min: 0 });
  if (flags.loraDropout !== undefined) spec.loraDropout = numberFlag('--lora-dropout', flags.loraDropout, { min: 0, max: 0.999999 });
  if (flags.targetModules !== undefined) {
    const t = flags.targetModules.trim();
    spec.targetModules = t === 'all-linear' ? t : t.split(',').map((m) => m.trim()).filter(Boolean);
  }
  if (flags.layers !== undefined) spec.layersToTransform = intList('--layers', flags.layers);
  if (flags.numVirtualTokens !== undefined) spec.numVirtualTokens = numberFlag('--num-virtual-tokens', flags.numVirtualTokens, { min: 1, integer: true });
  return spec;
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s % 60).padStart(2, '0')}s`;
}

/** One human line per event. */
export function describe(e: TrainEvent): string {
  switch (e.type) {
    case 'start':
      return `${e.resumed ? 'resuming at' : 'training from'} step ${e.step}/${e.totalSteps} on ${e.engine ?? e.backend}: ${e.trainRows} train rows, ${e.validationRows} validation rows, ${e.trainableParameters} trainable parameters`;
    case 'step':
      return `step ${e.step}/${e.totalSteps}  loss ${e.loss.toFixed(4)}  lr ${e.lr.toExponential(2)}  ${Math.round(e.tokensPerSecond)} tok/s  eta ${duration(e.etaSeconds)}`;
    case 'eval':
      return `eval  step ${e.step}  val loss ${e.loss.toFixed(4)}  ppl ${e.perplexity.toFixed(2)}${e.accuracy === undefined ? '' : `  accuracy ${(100 * e.accuracy).toFixed(1)}%`}`;
    case 'checkpoint':
      return `checkpoint  step ${e.step}  ${e.dir}`;
    case 'done':
      return e.adapterDir ? `done: adapter in ${e.adapterDir}` : `stopped at step ${e.step}; resume with --resume (checkpoint in ${e.checkpointDir ?? '-'})`;
  }
}

export function trainCommand(io: CommandIo = processIo): Command {
  const command = new Command('train')
    .description('fine-tune a PEFT adapter on a local model folder and data file, in this process')
    .option('--model <dir>', 'Hugging Face model folder')
    .option('--data <file>', '.jsonl of {"text"}, {"prompt","completion"} or {"text","label"}, or a plain .txt file')
    .option('--method <name>', 'PEFT method: lora, dora, lora_fa, prompt_tuning, ...')
    .option('--r <n>', 'LoRA rank')
    .option('--lora-alpha <a>', 'LoRA alpha')
    .option('--lora-dropout <p>', 'LoRA dropout')
    .option('--target-modules <list>', 'comma-separated module names (q_proj,v_proj) or all-linear')
    .option('--layers <list>', 'comma-separated layer indices to adapt')
    .option('--num-virtual-tokens <n>', 'prompt tuning: virtual tokens')
    .option('--out <dir>', 'output folder: checkpoint/ and, when done, adapter/')
    .option('--cut <B,T>', 'train as the split cut does: B bottom and T top blocks (default: the whole model)')
    .option('--engine <name>', ENGINE_FLAG_HELP);
  return addRecipeOptions(command).action(async (flags: TrainFlags) => {
      let cut: { bottom: number; top: number } | undefined;
      if (flags.cut !== undefined) {
        const parts = intList('--cut', flags.cut);
        if (parts.length !== 2) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--cut', `must be two integers B,T, got ${JSON.stringify(flags.cut)}`);
        cut = { bottom: parts[0], top: parts[1] };
      }
      const options = {
        modelDir: requiredFlag('--model', flags.model),
        dataFile: requiredFlag('--data', flags.data),
        outDir: requiredFlag('--out', flags.out),
        methods: [methodSpec(flags)],
        ...recipeFromFlags(flags),
        ...(cut ? { cut } : {}),
        engine: engineFlag(flags),
        log: flags.json ? undefined : io.log,
      };
      // On a terminal the step line rewrites itself; elsewhere each report is a plain line.
      const live = !flags.json && io === processIo && process.stdout.isTTY;
      let open = false;
      const report = (e: TrainEvent) => {
        if (flags.json) return io.out(JSON.stringify(e));
        const line = describe(e);
        if (live && e.type === 'step') {
          process.stdout.write(`\r\x1b[K${line}`);
          open = true;
          return;
        }
        if (open) process.stdout.write('\n');
        open = false;
        io.out(line);
      };
      await trainLocal(options, report);
    });
}
