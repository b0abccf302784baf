// What a federation asks of an owner's local training, on top of the one training run:
// FedProx (Li et al., MLSys 2020) adds the proximal term μ/2·‖w − w_global‖² to the local
// loss, whose gradient μ·(w − w_global) is added to each trainable tensor's gradient; FFA-LoRA
// (Sun et al., ICLR 2024) freezes every LoRA A, so its gradient is dropped. Both act through
// the adapter's projectGradients, which the trainer calls after clipping and before the
// optimizer step: the proximal gradient is exact and is not clipped with the loss's.
import { tf } from '../backend.ts';
import type { PeftAdapter } from '../peft/index.ts';
import { FederationError } from './errors.ts';
import { ffaAggregates } from './lora.ts';

/** μ/2·Σ‖w_k − g_k‖²: the FedProx term itself (what its gradient is the gradient of). */
export function proximalTerm(weights: ReadonlyMap<string, tf.Tensor>, global: ReadonlyMap<string, tf.Tensor>, mu: number): tf.Scalar {
  return tf.tidy(() => {
    const parts = [...weights].map(([k, w]) => tf.sum(tf.square(tf.sub(w, global.get(k)!))));
    return tf.mul(parts.length ? tf.addN(parts) : tf.scalar(0), mu / 2) as tf.Scalar;
  });
}

/** grads[k] += μ·(w_k − g_k) for every trainable tensor, in place (a missing gradient is the term's alone). */
export function addProximalGradients(grads: Map<string, tf.Tensor>, weights: ReadonlyMap<string, tf.Tensor>, global: ReadonlyMap<string, tf.Tensor>, mu: number): void {
  for (const [k, w] of weights) {
    const g0 = global.get(k);
    if (!g0) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `the global adapter lacks trainable tensor ${k}`, { field: k });
    const prev = grads.get(k);
    const next = tf.tidy(() => {
      const prox = tf.mul(tf.sub(w, g0), mu);
      return prev ? tf.add(prev, prox) : prox;
    });
    prev?.dispose();
    grads.set(k, next);
  }
}

export interface LocalRoundOptions {
  /** FedProx's μ; 0 or absent adds nothing. */
  fedproxMu?: number;
  /** FFA-LoRA: every LoRA A stays as the global adapter has it. */
  freezeLoraA?: boolean;
}

/**
 * Makes `adapter` train a federated round's local objective: the proximal pull towards the
 * weights it holds now (the global adapter) and/or frozen LoRA A. Returns the undo, which
 * frees the copy of the global weights.
 */
export function constrainLocalRound(adapter: PeftAdapter, options: LocalRoundOptions): () => void {
  const mu = options.fedproxMu ?? 0;
  if (!Number.isFinite(mu) || mu < 0) throw new FederationError('TANDEM_FED_AGGREGATION_INVALID', `fedproxMu must be a finite number ≥ 0, got ${mu}`, { field: 'fedproxMu' });
  if (mu === 0 && !options.freezeLoraA) return () => undefined;
  const weights = adapter.trainableVariables();
  const global = new Map([...weights].map(([k, v]) => [k, tf.keep(tf.clone(v))] as const));
  const own = Object.hasOwn(adapter, 'projectGradients');
  const inner = adapter.projectGradients?.bind(adapter);
  adapter.projectGradients = (grads: Map<string, tf.Tensor>): void => {
    if (options.freezeLoraA) {
      for (const k of [...grads.keys()]) {
        if (ffaAggregates(k)) continue;
        grads.get(k)!.dispose();
        grads.delete(k);
      }
    }
    if (mu > 0) addProximalGradients(grads, options.freezeLoraA ? new Map([...weights].filter(([k]) => ffaAggregates(k))) : weights, global, mu);
    inner?.(grads);
  };
  return () => {
    if (own) adapter.projectGradients = inner;
    else delete (adapter as { projectGradients?: unknown }).projectGradients;
    tf.dispose([...global.values()]);
  };
}
