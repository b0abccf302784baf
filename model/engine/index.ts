// The ONNX Runtime engine: the frozen backbone from graphs built in TypeScript, and the choice
// of engine at start. Other folders reach it through model/index.ts.
export { OrtKvCache, OrtLlama, loadOrt } from './ort-llama.ts';
export type { BottomForward, KeptForward, LoraParams, LoraStepResult, OrtEngineOptions, OrtProvider, SegmentAdapters, SegmentGradients, TopStepResult } from './ort-llama.ts';
export { loraGradNames, loraInputNames, loraPaths, modulePath } from './llama-graphs.ts';
export type { LoraSpec, SegmentAdapterSpec, WeightArrays } from './llama-graphs.ts';
export { ENGINES, activeEngine, parseEngineName, selectEngine } from './select.ts';
export type { EngineChoice, EngineName } from './select.ts';
export { ArrayAdamW } from './adamw.ts';
export type { ArrayAdamWOptions } from './adamw.ts';
export { createOrtMatMul } from './ort-matmul.ts';
export type { OrtMatMul } from './ort-matmul.ts';
export { OrtMiddle, OrtMiddleExecutor } from './middle.ts';
export type { BlockRange, Shape3 } from './middle.ts';
export { PackedBlocks } from './packed-blocks.ts';
export type { ActiveSegment, PackedLinearDelta, PackedSegment } from './packed-blocks.ts';
export { segmentLoraDelta } from './segment-lora.ts';
export { segmentIa3Delta, sumDeltas } from './segment-ia3.ts';
export type { Ia3Scale, SegmentIa3 } from './segment-ia3.ts';
export type { LoraFactors, SegmentLora } from './segment-lora.ts';
export { OrtServingEngine, ServingLora, ServingSequence } from './serving-engine.ts';
export type { ServingRow, ServingTimings } from './serving-engine.ts';
export { ServingThread, ThreadSequence } from './serving-thread.ts';
