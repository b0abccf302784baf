// Label leakage from g_M = dL/dh_M (Li et al., "Label Leakage and Protection in Two-party
// Split Learning"): the cloud scores each example by the norm of its gradient (norm attack)
// or by its cosine similarity to the gradient of one example whose label it knows (direction
// attack), and we report how well each score separates the classes as an AUC.
import { tf } from '../backend.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { Rng } from '../random.ts';
import type { Batch } from '../train/batch.ts';
import { batchTensors } from '../train/batch.ts';
import { rowLogLikelihood } from '../train/evaluate.ts';
import { gradientsOf } from '../train/gradients.ts';
import { leakAuc } from './auc.ts';
import { noiseHiddenInPlace, perturbGradientInPlace } from './defenses.ts';
import { labelClasses } from './marvell.ts';
import type { Defenses } from './defenses.ts';

export interface LabelLeakResult {
  /** Mean over classes of the one-vs-rest AUC (max(AUC, 1 − AUC)) of the norm attack. */
  aucNorm: number;
  /** The same for the direction attack (cosine to one known example of the class). */
  aucDirection: number;
  examples: number;
  classes: number;
}

/**
 * g_M for each example as the cloud receives it during training: the base's bottom (with the
 * h_B noise, if any), the middle, then the top's loss on the label tokens; the label defenses
 * are applied per micro-batch of `microbatch` examples. Returns one flat vector per example.
 */
export function middleGradients(model: LlamaModel, batch: Batch, cut: { bottom: number; top: number }, defenses: Defenses, microbatch: number, rng: Rng): Float32Array[] {
  const L = model.numLayers;
  const d = model.config.hiddenSize;
  const seq = batch.ids[0].length;
  const out: Float32Array[] = [];
  for (let start = 0; start < batch.ids.length; start += microbatch) {
    const part: Batch = { ids: batch.ids.slice(start, start + microbatch), labels: batch.labels.slice(start, start + microbatch) };
    const rows = part.ids.length;
    const { ids, labels } = batchTensors(part);
    const hB = tf.tidy(() => {
      const h0 = model.embed(ids);
      return cut.bottom > 0 ? model.blocks(h0, 0, cut.bottom, { positionOffset: 0 }) : h0;
    });
    const clean = Float32Array.from(hB.dataSync());
    hB.dispose();
    const hBData = Float32Array.from(clean);
    if (defenses.noise) noiseHiddenInPlace(hBData, d, defenses.noise, rng);
    const hM = tf.tidy((): tf.Tensor3D => {
      const out = model.blocks(tf.tensor3d(hBData, [rows, seq, d]), cut.bottom, L - cut.top, { positionOffset: 0 });
      // The edge takes its own perturbation back out of h_M (DefendedMiddle), so its top, and the g_M it sends, see that.
      if (!defenses.noise || defenses.noise.restore === false) return out;
      return tf.add(out, tf.sub(tf.tensor3d(clean, [rows, seq, d]), tf.tensor3d(hBData, [rows, seq, d]))) as tf.Tensor3D;
    });
    const { value, grads } = gradientsOf(() => {
      const h = cut.top > 0 ? model.blocks(hM, L - cut.top, L, { positionOffset: 0 }) : hM;
      return tf.neg(tf.sum(rowLogLikelihood(model.head(h), labels))) as tf.Scalar;
    }, [hM]);
    const g = Float32Array.from((grads[0] as tf.Tensor).dataSync());
    tf.dispose([value, ...grads.filter((x): x is tf.Tensor => x !== undefined), hM, ids, labels]);
    perturbGradientInPlace(g, seq * d, defenses, rng, labelClasses(part.labels));
    for (let r = 0; r < rows; r++) out.push(g.slice(r * seq * d, (r + 1) * seq * d));
  }
  return out;
}

function norm(v: Float32Array): number {
  let s = 0;
  for (const x of v) s += x * x;
  return Math.sqrt(s);
}

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0;
  for (let i = 0; i < a.length; i++) dot += a[i] * b[i];
  return dot / Math.max(norm(a) * norm(b), 1e-30);
}

/** The norm and direction attacks on per-example gradients with their (private) class labels. */
export function labelLeakage(gradients: readonly Float32Array[], classes: readonly string[]): LabelLeakResult {
  const names = [...new Set(classes)].sort();
  const norms = gradients.map(norm);
  let aucNorm = 0;
  let aucDirection = 0;
  let counted = 0;
  for (const c of names) {
    const members = classes.flatMap((k, i) => (k === c ? [i] : []));
    if (members.length < 2 || members.length === classes.length) continue;
    const positive = classes.map((k) => k === c);
    aucNorm += leakAuc(norms, positive);
    // The attacker knows the label of one example of the class and compares the others to it.
    const ref = members[0];
    const others = gradients.flatMap((_, i) => (i === ref ? [] : [i]));
    aucDirection += leakAuc(others.map((i) => cosine(gradients[i], gradients[ref])), others.map((i) => positive[i]));
    counted++;
  }
  return { aucNorm: counted ? aucNorm / counted : 0.5, aucDirection: counted ? aucDirection / counted : 0.5, examples: gradients.length, classes: names.length };
}
