// How closely the emulated model follows the full one on held-out text: both perplexities
// and the cosine similarity of the middle's outputs, token by token.
import { causalLmLoss, tf } from '../model/index.ts';
import type { LlamaModel, Row } from '../model/index.ts';
import type { EmulatorLayout } from './layer-drop.ts';

export interface FidelityFigures {
  tokens: number;
  fullLoss: number;
  emulatorLoss: number;
  fullPerplexity: number;
  emulatorPerplexity: number;
  middleCosine: number;
}

export function measureFidelity(full: LlamaModel, emulated: LlamaModel, layout: EmulatorLayout, rows: readonly Row[], batchSize: number): FidelityFigures {
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
    const [f, e, c, count] = tf.tidy(() => {
      const hB = full.blocks(full.embed(ids), 0, B);
      const hT = full.blocks(hB, B, L - T);
      const hS = emulated.blocks(hB, B, B + K);
      const fl = causalLmLoss(full.head(full.blocks(hT, L - T, L)), labels);
      const el = causalLmLoss(emulated.head(emulated.blocks(hS, B + K, B + K + T)), labels);
      const dot = tf.sum(tf.mul(hT, hS), -1);
      const norms = tf.mul(tf.norm(hT, 'euclidean', -1), tf.norm(hS, 'euclidean', -1));
      const cos = tf.sum(tf.div(dot, tf.maximum(norms, 1e-12)));
      return [fl.sum.dataSync()[0], el.sum.dataSync()[0], cos.dataSync()[0], fl.count];
    });
    tf.dispose([ids, labels]);
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
