// The recipe: every setting that decides the numbers a training run produces, with one name
// each (transformers' TrainingArguments names where they have one), used by every run.
import { ModelError } from '../errors.ts';
import { OPTIMIZER_KINDS } from './optimizer.ts';
import type { OptimizerKind } from './optimizer.ts';
import { SCHEDULES } from './schedule.ts';
import type { ScheduleKind } from './schedule.ts';

export interface TrainRecipe {
  /** Optimizer steps. */
  steps: number;
  /** Rows per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step (pipelined over the wire in split mode). */
  gradientAccumulationSteps: number;
  seqLen: number;
  /** Peak learning rate. */
  lr: number;
  /** Linear warm-up steps. */
  warmupSteps: number;
  schedule: ScheduleKind;
  optimizer: OptimizerKind;
  weightDecay: number;
  /** SGD momentum (ignored by AdamW). */
  momentum: number;
  /** Global gradient-norm limit; 0 turns clipping off. */
  maxGradNorm: number;
  /** Seed of the data split, the shuffles, the adapter's initialisation and dropout. */
  seed: number;
  valFraction: number;
  /** Pack short sequences into rows. */
  pack: boolean;
}

export const DEFAULT_RECIPE: Readonly<Omit<TrainRecipe, 'steps'>> = {
  batchSize: 8,
  gradientAccumulationSteps: 1,
  seqLen: 256,
  lr: 2e-4,
  warmupSteps: 0,
  schedule: 'cosine',
  optimizer: 'adamw',
  weightDecay: 0.01,
  momentum: 0.9,
  maxGradNorm: 1,
  seed: 0,
  valFraction: 0.1,
  pack: true,
};

function invalid(field: string, message: string): ModelError {
  return new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${field} ${message}`, { field });
}

/** Throws TANDEM_TRAIN_OPTION_INVALID naming the field for a setting outside its range. */
export function checkInteger(value: number, field: string, min = 1): void {
  if (!Number.isInteger(value) || value < min) throw invalid(field, `must be an integer ≥ ${min}, got ${value}`);
}

function checkNonNegative(value: number, field: string): void {
  if (!(Number.isFinite(value) && value >= 0)) throw invalid(field, `must be a number ≥ 0, got ${value}`);
}

/** Checks every setting of a recipe before any work. */
export function checkRecipe(r: TrainRecipe): void {
  checkInteger(r.steps, 'steps');
  checkInteger(r.batchSize, 'batchSize');
  checkInteger(r.gradientAccumulationSteps, 'gradientAccumulationSteps');
  checkInteger(r.seqLen, 'seqLen', 2);
  checkInteger(r.warmupSteps, 'warmupSteps', 0);
  if (!(Number.isFinite(r.lr) && r.lr > 0)) throw invalid('lr', `must be a number > 0, got ${r.lr}`);
  if (!(SCHEDULES as readonly string[]).includes(r.schedule)) throw invalid('schedule', `must be one of ${SCHEDULES.join(', ')}, got ${JSON.stringify(r.schedule)}`);
  if (!(OPTIMIZER_KINDS as readonly string[]).includes(r.optimizer)) throw invalid('optimizer', `must be one of ${OPTIMIZER_KINDS.join(', ')}, got ${JSON.stringify(r.optimizer)}`);
  checkNonNegative(r.weightDecay, 'weightDecay');
  checkNonNegative(r.momentum, 'momentum');
  checkNonNegative(r.maxGradNorm, 'maxGradNorm');
  if (!Number.isInteger(r.seed) || r.seed < 0 || r.seed >= 2 ** 32) throw invalid('seed', `must be an integer in [0, 2^32), got ${r.seed}`);
  if (!(Number.isFinite(r.valFraction) && r.valFraction >= 0 && r.valFraction < 1)) throw invalid('valFraction', `must be a number in [0, 1), got ${r.valFraction}`);
}

/**
 * Throws TANDEM_TRAIN_OPTION_INVALID (field seqLen) unless a row of `seqLen` tokens, plus the
 * virtual tokens an adapter prepends (prompt tuning), fits the model's positions. Called
 * where the recipe first meets the model's config: before the data is read and before any
 * tensor of seq² size is built.
 */
export function checkRecipeFitsModel(recipe: Pick<TrainRecipe, 'seqLen'>, config: { readonly maxPositionEmbeddings: number }, virtualTokens = 0): void {
  const limit = config.maxPositionEmbeddings;
  const positions = recipe.seqLen + virtualTokens;
  if (!(positions <= limit)) {
    const what = virtualTokens > 0 ? `${recipe.seqLen} plus the adapter's ${virtualTokens} virtual tokens` : `${recipe.seqLen}`;
    throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `seqLen ${what} exceeds the model's max_position_embeddings ${limit}`, { field: 'seqLen', details: { seqLen: recipe.seqLen, virtualTokens, limit } });
  }
}
