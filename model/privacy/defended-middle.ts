// The edge's defenses applied where tensors leave it: a Middle that wraps the real one (the
// remote middle in split mode, a LocalMiddle in simulations) and perturbs h_B before forward
// and g_M before backward. What the inner middle receives is exactly what the cloud sees.
import { tf } from '../backend.ts';
import { Rng } from '../random.ts';
import type { Middle, MicrobatchKey } from '../train/middle.ts';
import { checkDefenses, medianTokenNorm, spreadScales, noiseHidden, perturbGradient, perturbsGradient } from './defenses.ts';
import { labelClasses } from './marvell.ts';
import type { Defenses } from './defenses.ts';

export class DefendedMiddle implements Middle {
  private readonly rng: Rng;
  private readonly defenses: Defenses;

  constructor(
    private readonly inner: Middle,
    defenses: Defenses,
    seed = 0,
  ) {
    this.defenses = structuredClone(checkDefenses(defenses));
    this.rng = new Rng(seed);
  }

  get trainsParameters(): boolean {
    return this.inner.trainsParameters;
  }

  /** The defenses in force; a noise clip of 0 is fixed from the first h_B (its median token norm). */
  get applied(): Readonly<Defenses> {
    return this.defenses;
  }

  async forward(h: tf.Tensor3D, key: MicrobatchKey, backward: boolean): Promise<tf.Tensor3D> {
    const noise = this.defenses.noise;
    if (!noise) return this.inner.forward(h, key, backward);
    if (!(noise.clip > 0)) noise.clip = medianTokenNorm(h.dataSync() as Float32Array, h.shape[2]) || 1;
    if (noise.spread && !noise.scales) noise.scales = spreadScales(h.dataSync() as Float32Array, h.shape[2]);
    const noised = noiseHidden(h, noise, this.rng);
    try {
      const out = await this.inner.forward(noised, key, backward);
      if (noise.restore === false) return out;
      // The middle is residual (h_M = h̃_B + Σ block outputs), so the perturbation the edge
      // drew, h̃_B − h_B, reaches h_M unchanged: the edge, which alone knows it, takes it back.
      try {
        return tf.tidy(() => tf.add(out, tf.sub(h, noised)));
      } finally {
        out.dispose();
      }
    } finally {
      noised.dispose();
    }
  }

  /** `labels` (the micro-batch's label rows, kept here) give Marvell each example's class; they are not passed on. */
  async backward(g: tf.Tensor3D, key: MicrobatchKey, labels?: readonly (readonly number[])[]): Promise<tf.Tensor3D> {
    if (!perturbsGradient(this.defenses)) return this.inner.backward(g, key);
    const perturbed = perturbGradient(g, this.defenses, this.rng, labels ? labelClasses(labels) : undefined);
    try {
      return await this.inner.backward(perturbed, key);
    } finally {
      perturbed.dispose();
    }
  }

  takeGradients(): Map<string, tf.Tensor> {
    return this.inner.takeGradients?.() ?? new Map();
  }

  dispose(): void {
    this.inner.dispose?.();
  }
}
