// How closely the emulated model follows the full one on held-out text: both perplexities
// and the cosine similarity of the middle's outputs, token by token.
import { causalLmLoss, tf } from '../model/index.ts';
import type { LlamaModel, OrtLlama, Row } from '../model/index.ts';
import type { EmulatorLayout } from './layer-drop.ts';

export interface FidelityFigures {
  tokens: number;
  fullLoss: number;
  emulatorLoss: number;
  fullPerplexity: number;
  emulatorPerplexity: number;
  middleCosine: number;
}

/** The frozen parts of both models on ONNX Runtime when given (engines over each model's weights). */
export interface FidelityEngines {
  full: OrtLlama;
  emulated: OrtLlama;
}

/** The hidden states and logits of one batch, each model's frozen parts on its engine. */
async function fidelityOnEngines(engines: FidelityEngines, ids: readonly (readonly number[])[], layout: EmulatorLayout): Promise<Record<'hB' | 'hT' | 'hS' | 'fullLogits' | 'emulatedLogits', tf.Tensor3D>> {
  const { bottom: B, top: T } = layout.cut;
  const K = layout.kept.length;
  const L = layout.numLayers;
  const b = ids.length;
  const s = ids[0].length;
  const hidden: [number, number, number] = [b, s, engines.full.config.hiddenSize];
  const vocab: [number, number, number] = [b, s, engines.full.config.vocabSize];
  const hB = (await engines.full.bottom(Int32Array.from(ids.flat()), b, s, B, undefined, undefined, false)).output;
  const hT = await engines.full.blocks(hB, b, s, B, L - T);
  const hS = await engines.emulated.blocks(hB, b, s, B, B + K);
  const fullLogits = await engines.full.topLogits(hT, b, s, L - T);
  const emulatedLogits = await engines.emulated.topLogits(hS, b, s, B + K);
  return {
    hB: tf.tensor3d(hB, hidden), hT: tf.tensor3d(hT, hidden), hS: tf.tensor3d(hS, hidden),
    fullLogits: tf.tensor3d(fullLogits, vocab), emulatedLogits: tf.tensor3d(emulatedLogits, vocab),
  };
}

export async function measureFidelity(full: LlamaModel, emulated: LlamaModel, layout: EmulatorLayout, rows: readonly Row[], batchSize: number, engines?: FidelityEngines): Promise<FidelityFigures> {
  const B = layout.cut.bottom;
  const K = layout.kept.length;
  const L = layout.numLayers;
  const T = layout.cut.top;
  let fullSum = 0;
  let emuSum = 0;
  let tokens = 0;
  let cosSum = 0;
  let positions = 0;
  for (let i = 0; i < rows.length; i += batchSize) {
    const chunk = rows.slice(i, i + batchSize);
    const seq = chunk[0].ids.length;
    const ids = tf.tensor2d(chunk.flatMap((r) => r.ids), [chunk.length, seq], 'int32');
    const labels = tf.tensor2d(chunk.flatMap((r) => r.labels), [chunk.length, seq], 'int32');
    const onEngine = engines ? await fidelityOnEngines(engines, chunk.map((r) => r.ids), layout) : undefined;
    const [f, e, c, count] = tf.tidy(() => {
      const hB = onEngine?.hB ?? full.blocks(full.embed(ids), 0, B);
      const hT = onEngine?.hT ?? full.blocks(hB, B, L - T);
      const hS = onEngine?.hS ?? emulated.blocks(hB, B, B + K);
      const fl = causalLmLoss(onEngine?.fullLogits ?? full.head(full.blocks(hT, L - T, L)), labels);
      const el = causalLmLoss(onEngine?.emulatedLogits ?? emulated.head(emulated.blocks(hS, B + K, B + K + T)), labels);
      const dot = tf.sum(tf.mul(hT, hS), -1);
      const norms = tf.mul(tf.norm(hT, 'euclidean', -1), tf.norm(hS, 'euclidean', -1));
      const cos = tf.sum(tf.div(dot, tf.maximum(norms, 1e-12)));
      return [fl.sum.dataSync()[0], el.sum.dataSync()[0], cos.dataSync()[0], fl.count];
    });
    tf.dispose([ids, labels, ...(onEngine ? Object.values(onEngine) : [])]);
    fullSum += f;
    emuSum += e;
    tokens += count;
    cosSum += c;
    positions += chunk.length * seq;
  }
  const fullLoss = fullSum / Math.max(tokens, 1);
  const emulatorLoss = emuSum / Math.max(tokens, 1);
  return { tokens, fullLoss, emulatorLoss, fullPerplexity: Math.exp(fullLoss), emulatorPerplexity: Math.exp(emulatorLoss), middleCosine: cosSum / Math.max(positions, 1) };
}
