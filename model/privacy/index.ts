// Privacy measured: the honest-but-curious cloud's attacks (token inversion from h_B, label
// leakage from g_M), the edge's defenses and the middle that applies them, and the audit.
export { leakAuc, rocAuc } from './auc.ts';
export { AUDIT_LIMITS, AUTO_MAX_LOSS_COST, chooseDefenses, forwardLoss, labelBatch, measureAttacks, resolveClip, runAudit, streamRows, tokenStream } from './audit.ts';
export type { AttackFigures, AuditOptions, AuditReport, MeasureInput } from './audit.ts';
export { DefendedMiddle } from './defended-middle.ts';
export { distanceCorrelation, noPeekGradient } from './distance-correlation.ts';
export {
  AUTO_BOTTOM,
  AUTO_DEFENSES,
  autoDefenses,
  DEFENSE_LIMITS,
  DEFENSE_NAMES,
  checkDefenses,
  defenseNames,
  describeDefenses,
  hiddenNoiseStd,
  medianTokenNorm,
  noiseHidden,
  noiseHiddenInPlace,
  parseDefenses,
  perturbGradient,
  perturbGradientInPlace,
  perturbsGradient,
  spreadScales,
} from './defenses.ts';
export { TRAINED_RUN_LIMITS, trainUnderDefenses } from './training-cost.ts';
export type { TrainedRun, TrainedRunOptions } from './training-cost.ts';
export { labelClasses, marvellInPlace, solveMarvellSplit } from './marvell.ts';
export type { MarvellSplit, SplitStatistics } from './marvell.ts';
export type { DefenseName, Defenses, HiddenNoise } from './defenses.ts';
export { PRIVACY_ERRORS, PrivacyError } from './errors.ts';
export type { PrivacyErrorCode } from './errors.ts';
export { baseBottom, learnedInversion, nearestNeighbourInversion, observedBottom } from './inversion.ts';
export type { InversionResult, LearnedInversionOptions } from './inversion.ts';
export { labelLeakage, middleGradients } from './label-leak.ts';
export type { LabelLeakResult } from './label-leak.ts';
