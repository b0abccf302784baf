// The entry for tests and benchmarks only: synthetic configurations and weights, and switching
// backends inside one process. Nothing outside test/ and bench/ imports it.
export { SMOLLM_135M_SHAPE, llamaConfig, randomWeights } from './init.ts';
export { useBackend } from './backend.ts';
