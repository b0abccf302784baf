// The training-recipe flags that `tandem train`, `tandem edge train` and `tandem edge offsite`
// share, with the recipe's defaults, each checked before any work; and the codec flags.
import type { Command } from 'commander';
import { DEFAULT_RECIPE, OPTIMIZER_KINDS, SCHEDULES } from '../model/index.ts';
import type { OptimizerKind, ScheduleKind, TrainRecipe } from '../model/index.ts';
import { CODEC_NAMES } from '../protocol/index.ts';
import type { CodecName } from '../protocol/index.ts';
import { CliError } from './errors.ts';
import { numberFlag } from './flags.ts';

export interface RecipeFlags {
  steps?: string;
  batchSize?: string;
  gradAccum?: string;
  seqLen?: string;
  lr?: string;
  warmup?: string;
  schedule?: string;
  optimizer?: string;
  weightDecay?: string;
  momentum?: string;
  clip?: string;
  seed?: string;
  valFraction?: string;
  evalEvery?: string;
  saveEvery?: string;
  pack: boolean;
  resume?: boolean;
  json?: boolean;
  backend?: string;
}

export function choice<T extends string>(flag: string, value: string | undefined, values: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (!(values as readonly string[]).includes(value)) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `must be one of ${values.join(', ')}, got ${JSON.stringify(value)}`);
  return value as T;
}

/** Adds the recipe flags, with the recipe's defaults. */
export function addRecipeOptions(command: Command): Command {
  return command
    .option('--steps <n>', 'optimizer steps')
    .option('--batch-size <n>', 'rows per micro-batch', String(DEFAULT_RECIPE.batchSize))
    .option('--grad-accum <n>', 'micro-batches per optimizer step (pipelined in split mode)', String(DEFAULT_RECIPE.gradientAccumulationSteps))
    .option('--seq-len <n>', 'tokens per row', String(DEFAULT_RECIPE.seqLen))
    .option('--lr <x>', 'peak learning rate', String(DEFAULT_RECIPE.lr))
    .option('--warmup <n>', 'linear warm-up steps', String(DEFAULT_RECIPE.warmupSteps))
    .option('--schedule <kind>', `learning-rate decay after warm-up: ${SCHEDULES.join(', ')}`, DEFAULT_RECIPE.schedule)
    .option('--optimizer <kind>', `${OPTIMIZER_KINDS.join(', ')}`, DEFAULT_RECIPE.optimizer)
    .option('--weight-decay <x>', 'weight decay (decoupled for adamw)', String(DEFAULT_RECIPE.weightDecay))
    .option('--momentum <x>', 'sgd momentum', String(DEFAULT_RECIPE.momentum))
    .option('--clip <x>', 'clip gradients to this global norm; 0 turns clipping off', String(DEFAULT_RECIPE.maxGradNorm))
    .option('--seed <n>', 'seed of the split, the shuffles, the adapter and dropout', String(DEFAULT_RECIPE.seed))
    .option('--val-fraction <x>', 'fraction of the data held out for validation', String(DEFAULT_RECIPE.valFraction))
    .option('--eval-every <n>', 'validate every n steps (0: only at the end)', '0')
    .option('--save-every <n>', 'checkpoint every n steps (0: only at the end)', '0')
    .option('--no-pack', 'one sequence per row instead of packing short ones together')
    .option('--resume', 'continue the checkpoint exactly (it must exist)')
    .option('--json', 'one JSON object per line per report')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu');
}

/** The recipe and run settings from the flags, each checked against its range. */
export function recipeFromFlags(flags: RecipeFlags): TrainRecipe & { evalEvery: number; saveEvery: number; resume: boolean; backend?: string } {
  const int = (flag: string, value: string | undefined, min = 0) => numberFlag(flag, value, { min, integer: true });
  return {
    steps: int('--steps', flags.steps, 1),
    batchSize: int('--batch-size', flags.batchSize, 1),
    gradientAccumulationSteps: int('--grad-accum', flags.gradAccum, 1),
    seqLen: int('--seq-len', flags.seqLen, 2),
    lr: numberFlag('--lr', flags.lr, { min: Number.MIN_VALUE }),
    warmupSteps: int('--warmup', flags.warmup),
    schedule: choice<ScheduleKind>('--schedule', flags.schedule, SCHEDULES, DEFAULT_RECIPE.schedule),
    optimizer: choice<OptimizerKind>('--optimizer', flags.optimizer, OPTIMIZER_KINDS, DEFAULT_RECIPE.optimizer),
    weightDecay: numberFlag('--weight-decay', flags.weightDecay, { min: 0 }),
    momentum: numberFlag('--momentum', flags.momentum, { min: 0 }),
    maxGradNorm: numberFlag('--clip', flags.clip, { min: 0 }),
    seed: numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true }),
    valFraction: numberFlag('--val-fraction', flags.valFraction, { min: 0, max: 0.99 }),
    evalEvery: int('--eval-every', flags.evalEvery),
    saveEvery: int('--save-every', flags.saveEvery),
    pack: flags.pack,
    resume: flags.resume ?? false,
    backend: flags.backend,
  };
}

export interface CodecFlags {
  codecForward?: string;
  codecBackward?: string;
}

/** Adds the codec flags of a split run. */
export function addCodecOptions(command: Command, defaults: { forward: CodecName; backward: CodecName }): Command {
  return command
    .option('--codec-forward <codec>', `activation codec: ${CODEC_NAMES.join(', ')}`, defaults.forward)
    .option('--codec-backward <codec>', 'gradient codec (lossy ones use error feedback)', defaults.backward);
}

/** The codecs from the flags, each one of CODEC_NAMES. */
export function codecsFromFlags(flags: CodecFlags, defaults: { forward: CodecName; backward: CodecName }): { codecForward: CodecName; codecBackward: CodecName } {
  return {
    codecForward: choice<CodecName>('--codec-forward', flags.codecForward, CODEC_NAMES, defaults.forward),
    codecBackward: choice<CodecName>('--codec-backward', flags.codecBackward, CODEC_NAMES, defaults.backward),
  };
}
