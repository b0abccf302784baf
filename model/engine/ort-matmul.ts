// One frozen matmul as an ONNX Runtime session: x [m, k] · W [k, n], W given once. What
// per-kernel routing of tfjs's frozen matmuls to ORT would call; the bench measures its
// throughput and its per-call cost against whole-graph runs.
import type * as Ort from 'onnxruntime-node';
import { GraphBuilder } from './graph.ts';
import { ONNX_FLOAT, encodeModel } from './onnx-proto.ts';
import { loadOrt } from './ort-llama.ts';
import type { OrtProvider } from './ort-llama.ts';

export interface OrtMatMul {
  run(x: Float32Array, m: number): Promise<Float32Array>;
  release(): Promise<void>;
}

export async function createOrtMatMul(weight: Float32Array, k: number, n: number, options: { threads?: number; provider?: OrtProvider } = {}): Promise<OrtMatMul> {
  if (weight.length !== k * n) throw new Error(`weight has ${weight.length} values, expected ${k} x ${n}`);
  const ort = await loadOrt();
  const g = new GraphBuilder('matmul');
  const x = g.input('x', ONNX_FLOAT, ['m', k]);
  g.alias(g.matmul(x, g.weight('w', weight, [k, n])), 'y');
  g.output('y', ONNX_FLOAT, ['m', n]);
  const session: Ort.InferenceSession = await ort.InferenceSession.create(encodeModel(g.build()), {
    executionProviders: [options.provider ?? 'cpu'],
    intraOpNumThreads: options.threads,
    graphOptimizationLevel: 'all',
  });
  return {
    async run(input: Float32Array, m: number): Promise<Float32Array> {
      const out = await session.run({ x: new ort.Tensor('float32', input, [m, k]) });
      return out.y.data as Float32Array;
    },
    release: () => session.release(),
  };
}
