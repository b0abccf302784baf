// The one module that knows about tfjs backends, their registration and their quirks: the
// entry to model/backend/. Everything else imports `tf` from here, never from
// '@tensorflow/tfjs-*' directly. Importing it has no side effect; initBackend picks the backend.
//   backend/select.ts        which backend runs (initBackend, useBackend)
//   backend/wasm-kernels.ts  kernels the wasm backend lacks
//   backend/linear.ts        linear layers and batched matmuls with plain-matmul gradients
//   backend/tape.ts          the one gradient entry, and forwards whose tape outlives the call
//   backend/custom-op.ts     ops with their own gradient
//   backend/ranked.ts        rank-checked narrowing of tf.Tensor
export { tf } from './backend/tf.ts';
export { BACKENDS, activeBackend, initBackend, initFirstBackend, parseBackendName, useBackend } from './backend/select.ts';
export type { BackendChoice, BackendName } from './backend/select.ts';
export { batchMatMul, linear, transposeLast } from './backend/linear.ts';
export { gradients, tapedForward } from './backend/tape.ts';
export type { TapedForward } from './backend/tape.ts';
export { customOp } from './backend/custom-op.ts';
export type { CustomOpResult } from './backend/custom-op.ts';
export { as1D, as2D, as3D } from './backend/ranked.ts';
