// Serving many adapters on one backbone: batched steps over per-sequence KV caches, with each
// adapter's unmerged LoRA applied to its own rows. Other folders reach it through model/index.ts.
export { batchedLastLogits, checkServableHooks, kvBytesPerToken } from './batched-forward.ts';
export type { BatchRow } from './batched-forward.ts';
export { ortStepper, tfjsStepper } from './steppers.ts';
export type { OrtServing, ServingStepper, StepperSequence } from './steppers.ts';
