// Learning-rate schedules with the semantics of Hugging Face transformers'
// get_{cosine,linear,constant}_schedule_with_warmup: the multiplier at optimizer step k
// (0-based) is lambda(k), so with warm-up the first step runs at lr 0.
import { ModelError } from '../errors.ts';

export const SCHEDULES = ['cosine', 'linear', 'constant'] as const;
export type ScheduleKind = (typeof SCHEDULES)[number];

export interface ScheduleOptions {
  kind: ScheduleKind;
  /** Peak learning rate. */
  lr: number;
  warmupSteps: number;
  totalSteps: number;
}

/** The learning rate for 0-based optimizer step `step`. */
export function learningRate(options: ScheduleOptions, step: number): number {
  const { kind, lr, warmupSteps: warmup, totalSteps: total } = options;
  if (step < warmup) return (lr * step) / Math.max(1, warmup);
  switch (kind) {
    case 'constant':
      return lr;
    case 'linear':
      return lr * Math.max(0, (total - step) / Math.max(1, total - warmup));
    case 'cosine': {
      const progress = (step - warmup) / Math.max(1, total - warmup);
      return lr * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
    }
    default:
      throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `unknown schedule ${JSON.stringify(kind)}; choose one of ${SCHEDULES.join(', ')}`, { field: 'schedule' });
  }
}
