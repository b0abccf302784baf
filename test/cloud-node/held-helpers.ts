// Held middle adapters for the executor and checkpoint tests: random arrays, an adapter trained
// one step, a new session's adapter added to a set, its commits and gradients.
import { randomUUID } from 'node:crypto';
import { HeldAdapter } from '../../cloud-node/held-adapters.ts';
import type { HeldAdapters } from '../../cloud-node/held-adapters.ts';
import { Rng } from '../../model/index.ts';
import type { LlamaModel } from '../../model/index.ts';

export function random(n: number, rng: Rng, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.normal() * scale;
  return out;
}

/**
 * A held adapter on blocks 1-3 of `model`, moved off its init (LoRA's B is zero there) by one
 * committed step of random gradients; LoRA r 4 with lora_alpha `alpha` (8 unless given).
 */
export function trainedHeld(model: LlamaModel, seed: number, targets: string[], method: 'lora' | 'ia3' = 'lora', alpha = 8): HeldAdapter {
  const spec = { method, rank: method === 'lora' ? 4 : 0, alpha: method === 'lora' ? alpha : 0, targets, seed, methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 };
  const held = HeldAdapter.create(model, `00000000-0000-0000-0000-${String(seed).padStart(12, '0')}`, 't', spec, [1, 2, 3]);
  const rng = new Rng(seed);
  held.accumulate(1, 0, held.tensors().map((t) => random(t.data.length, rng)));
  held.commit({ sessionId: held.sessionId, step: 1, lr: 0.05, maxGradNorm: 0, edgeGradSquareSum: 0, microbatches: 1, exportAdapter: false });
  return held;
}

/** A middle LoRA spec as a Hello asks for it: r 4 on q_proj and v_proj, the adapter's second method. */
export const HELD_SPEC = { method: 'lora' as const, rank: 4, alpha: 8, targets: ['q_proj', 'v_proj'], methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, seed: 3 };

/** A new session's held adapter of `tenant` (HELD_SPEC on blocks 1-3), added to `adapters`: its first checkpoint is written. */
export async function addHeld(adapters: HeldAdapters, model: LlamaModel, tenant: string): Promise<HeldAdapter> {
  const held = HeldAdapter.create(model, randomUUID(), tenant, HELD_SPEC, [1, 2, 3]);
  await adapters.add(held);
  return held;
}

/** A StepCommit of `step` stating `microbatches` backwards (clipping at 1 with the edge's squared norm 0.5). */
export const heldCommit = (sessionId: string, step: number, microbatches: number) => ({ sessionId, step, lr: 1e-2, maxGradNorm: 1, edgeGradSquareSum: 0.5, microbatches, exportAdapter: false });

/** Deterministic gradients of the adapter's tensors, different for each seed. */
export function gradientsLike(held: HeldAdapter, seed: number): Float32Array[] {
  return held.tensors().map((t, k) => t.data.map((_, i) => Math.sin(seed * 13.7 + k * 3.1 + i * 0.11) * 1e-2));
}
