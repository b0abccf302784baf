// The public API of training: the one training run, the loop with its middle interface,
// optimizers, schedules, data, checkpoints and the local runs the CLI calls.
export { clipGradNorm } from './clip.ts';
export { CHECKPOINT_ADAPTER_DIR, CHECKPOINT_VERSION, OPTIMIZER_FILE, TRAINER_STATE_FILE, checkSameRun, readTrainingCheckpoint, saveTrainingCheckpoint } from './checkpoint.ts';
export type { TrainerState, TrainingCheckpoint } from './checkpoint.ts';
export { BatchStream, exampleRows, labelRow, packRows, padRow, parseDataset, prepareData, readDataset, splitExamples } from './data.ts';
export type { BatchStreamState, DataFormat, Dataset, Example, PrepareOptions, PreparedData, Row, TextTokenizer } from './data.ts';
export { evaluateClassification, evaluateRows, labelTokens, localScorer, scoreLogits } from './evaluate.ts';
export type { ClassificationEvaluation, LmEvaluation, Scorer } from './evaluate.ts';
export { Trainer } from './loop.ts';
export type { Cut, StepResult, TrainerOptions } from './loop.ts';
export { batchTensors } from './batch.ts';
export type { Batch, BatchScore } from './batch.ts';
export { LocalMiddle, keyString, randomStateOf } from './middle.ts';
export type { LocalMiddleOptions, Middle, MicrobatchKey, RandomState } from './middle.ts';
export { AdamW, OPTIMIZER_KINDS, Sgd, createOptimizer } from './optimizer.ts';
export type { AdamWOptions, Optimizer, OptimizerKind, OptimizerState, SgdOptions, StateTensor } from './optimizer.ts';
export { DEFAULT_RECIPE, checkRecipe } from './recipe.ts';
export type { TrainRecipe } from './recipe.ts';
export { checkRun, checkpointFolder, fileHash, openRun, runSteps, runTraining } from './training-run.ts';
export type { CheckpointStore, Evaluation, RemoteStart, RunSettings, RunState, TrainEvent, TrainEventHandler, TrainingResult, TrainingSpec, WireProgress } from './training-run.ts';
export { ADAPTER_DIR, CHECKPOINT_DIR, evaluateLocal, exportAdapter, trainLocal } from './run.ts';
export type { EvaluateLocalOptions, EvaluationReport, ExportOptions, ExportResult, TrainLocalOptions, TrainSummary } from './run.ts';
export { SCHEDULES, learningRate } from './schedule.ts';
export type { ScheduleKind, ScheduleOptions } from './schedule.ts';
export { SCORE_BIAS, SCORE_WEIGHT, SequenceClassifier, classifiedRows } from './sequence-classifier.ts';
export type { ClassifiedRow, SequenceClassifierOptions } from './sequence-classifier.ts';
