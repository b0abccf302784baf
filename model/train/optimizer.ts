// Optimizers with PyTorch's exact update rules, so a run here and a run of the same
// recipe in PyTorch take the same steps. State is plain arrays for checkpoints.
import { tf } from '../backend.ts';
import { ModelError } from '../errors.ts';

/** A float32 tensor as stored in a checkpoint. */
export interface StateTensor {
  shape: number[];
  data: Float32Array;
}

/** Everything an optimizer needs to continue exactly where it stopped. */
export interface OptimizerState {
  kind: OptimizerKind;
  /** Steps taken so far (PyTorch's `state['step']`). */
  step: number;
  /** Per-parameter buffers, keyed `${slot}/${parameter name}`. */
  tensors: Map<string, StateTensor>;
}

export const OPTIMIZER_KINDS = ['adamw', 'sgd'] as const;
export type OptimizerKind = (typeof OPTIMIZER_KINDS)[number];

export interface Optimizer {
  readonly kind: OptimizerKind;
  /** Steps taken so far. */
  readonly stepCount: number;
  /** Applies one update with learning rate `lr`; `grads` holds a gradient for each parameter to update. */
  step(params: ReadonlyMap<string, tf.Variable>, grads: ReadonlyMap<string, tf.Tensor>, lr: number): void;
  state(): OptimizerState;
  /** Restores `state()`; a state of another kind or for other shapes is TANDEM_CHECKPOINT_INVALID. */
  load(state: OptimizerState, params: ReadonlyMap<string, tf.Variable>): void;
  dispose(): void;
}

export interface AdamWOptions {
  betas?: [number, number];
  eps?: number;
  weightDecay?: number;
}

export interface SgdOptions {
  momentum?: number;
  dampening?: number;
  weightDecay?: number;
  nesterov?: boolean;
}

function option(value: number, name: string, ok: (v: number) => boolean, rule: string): number {
  if (!Number.isFinite(value) || !ok(value)) throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `${name} must be ${rule}, got ${value}`, { field: name });
  return value;
}

abstract class BufferedOptimizer implements Optimizer {
  abstract readonly kind: OptimizerKind;
  protected readonly slots: readonly string[];
  protected readonly buffers = new Map<string, tf.Tensor>();
  protected t = 0;

  constructor(slots: readonly string[]) {
    this.slots = slots;
  }

  get stepCount(): number {
    return this.t;
  }

  abstract step(params: ReadonlyMap<string, tf.Variable>, grads: ReadonlyMap<string, tf.Tensor>, lr: number): void;

  protected buffer(slot: string, name: string): tf.Tensor | undefined {
    return this.buffers.get(`${slot}/${name}`);
  }

  protected setBuffer(slot: string, name: string, value: tf.Tensor): void {
    const key = `${slot}/${name}`;
    this.buffers.get(key)?.dispose();
    this.buffers.set(key, tf.keep(value));
  }

  state(): OptimizerState {
    const tensors = new Map<string, StateTensor>();
    for (const key of [...this.buffers.keys()].sort()) {
      const t = this.buffers.get(key) as tf.Tensor;
      tensors.set(key, { shape: [...t.shape], data: Float32Array.from(t.dataSync() as Float32Array) });
    }
    return { kind: this.kind, step: this.t, tensors };
  }

  load(state: OptimizerState, params: ReadonlyMap<string, tf.Variable>): void {
    if (state.kind !== this.kind) throw new ModelError('TANDEM_CHECKPOINT_INVALID', `the checkpoint holds ${state.kind} state, the run uses ${this.kind}`, { field: 'optimizer' });
    if (!Number.isInteger(state.step) || state.step < 0) throw new ModelError('TANDEM_CHECKPOINT_INVALID', `optimizer step must be a non-negative integer, got ${state.step}`, { field: 'optimizer.step' });
    for (const [key, t] of state.tensors) {
      const slash = key.indexOf('/');
      const slot = key.slice(0, slash);
      const p = params.get(key.slice(slash + 1));
      if (slash < 0 || !this.slots.includes(slot) || !p) throw new ModelError('TANDEM_CHECKPOINT_INVALID', 'optimizer state for a parameter the adapter does not have', { tensor: key });
      if (p.shape.length !== t.shape.length || p.shape.some((d, i) => d !== t.shape[i])) {
        throw new ModelError('TANDEM_CHECKPOINT_INVALID', `optimizer state has shape [${t.shape}], the parameter [${p.shape}]`, { tensor: key });
      }
    }
    this.dispose();
    for (const [key, t] of state.tensors) this.buffers.set(key, tf.keep(tf.tensor(t.data, t.shape, 'float32')));
    this.t = state.step;
  }

  dispose(): void {
    for (const t of this.buffers.values()) t.dispose();
    this.buffers.clear();
  }
}

/**
 * torch.optim.AdamW: decoupled weight decay p ← p(1 − lr·λ), then Adam with bias correction,
 * p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε).
 */
export class AdamW extends BufferedOptimizer {
  readonly kind = 'adamw' as const;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;

  constructor(options: AdamWOptions = {}) {
    super(['exp_avg', 'exp_avg_sq']);
    const [b1, b2] = options.betas ?? [0.9, 0.999];
    this.beta1 = option(b1, 'beta1', (v) => v >= 0 && v < 1, 'in [0, 1)');
    this.beta2 = option(b2, 'beta2', (v) => v >= 0 && v < 1, 'in [0, 1)');
    this.eps = option(options.eps ?? 1e-8, 'eps', (v) => v >= 0, '>= 0');
    this.weightDecay = option(options.weightDecay ?? 0.01, 'weight_decay', (v) => v >= 0, '>= 0');
  }

  step(params: ReadonlyMap<string, tf.Variable>, grads: ReadonlyMap<string, tf.Tensor>, lr: number): void {
    this.t += 1;
    const { beta1: b1, beta2: b2, eps, weightDecay: wd } = this;
    const bc1 = 1 - b1 ** this.t;
    const bc2Sqrt = Math.sqrt(1 - b2 ** this.t);
    for (const [name, p] of params) {
      const g = grads.get(name);
      if (!g) continue;
      tf.tidy(() => {
        const m0 = this.buffer('exp_avg', name) ?? tf.zerosLike(p);
        const v0 = this.buffer('exp_avg_sq', name) ?? tf.zerosLike(p);
        const m = tf.add(tf.mul(m0, b1), tf.mul(g, 1 - b1));
        const v = tf.add(tf.mul(v0, b2), tf.mul(tf.square(g), 1 - b2));
        const decayed = wd === 0 ? p : tf.mul(p, 1 - lr * wd);
        const denom = tf.add(tf.div(tf.sqrt(v), bc2Sqrt), eps);
        p.assign(tf.sub(decayed, tf.mul(tf.div(m, denom), lr / bc1)));
        this.setBuffer('exp_avg', name, m);
        this.setBuffer('exp_avg_sq', name, v);
      });
    }
  }
}

/**
 * torch.optim.SGD: g ← g + λp; with momentum b ← g on the first step, b ← μb + (1 − τ)g after;
 * g ← g + μb (Nesterov) or g ← b; p ← p − lr·g.
 */
export class Sgd extends BufferedOptimizer {
  readonly kind = 'sgd' as const;
  readonly momentum: number;
  readonly dampening: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;

  constructor(options: SgdOptions = {}) {
    super(['momentum_buffer']);
    this.momentum = option(options.momentum ?? 0, 'momentum', (v) => v >= 0, '>= 0');
    this.dampening = option(options.dampening ?? 0, 'dampening', (v) => v >= 0, '>= 0');
    this.weightDecay = option(options.weightDecay ?? 0, 'weight_decay', (v) => v >= 0, '>= 0');
    this.nesterov = options.nesterov ?? false;
    if (this.nesterov && (this.momentum <= 0 || this.dampening !== 0)) {
      throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', 'Nesterov momentum requires a momentum > 0 and zero dampening', { field: 'nesterov' });
    }
  }

  step(params: ReadonlyMap<string, tf.Variable>, grads: ReadonlyMap<string, tf.Tensor>, lr: number): void {
    this.t += 1;
    const { momentum: mu, dampening, weightDecay: wd } = this;
    for (const [name, p] of params) {
      const g0 = grads.get(name);
      if (!g0) continue;
      tf.tidy(() => {
        let g = wd === 0 ? g0 : tf.add(g0, tf.mul(p, wd));
        if (mu !== 0) {
          const prev = this.buffer('momentum_buffer', name);
          const b = prev ? tf.add(tf.mul(prev, mu), tf.mul(g, 1 - dampening)) : tf.clone(g);
          this.setBuffer('momentum_buffer', name, b);
          g = this.nesterov ? tf.add(g, tf.mul(b, mu)) : b;
        }
        p.assign(tf.sub(p, tf.mul(g, lr)));
      });
    }
  }
}

export function createOptimizer(kind: OptimizerKind, options: { weightDecay?: number; betas?: [number, number]; eps?: number; momentum?: number } = {}): Optimizer {
  switch (kind) {
    case 'adamw':
      return new AdamW({ weightDecay: options.weightDecay, betas: options.betas, eps: options.eps });
    case 'sgd':
      return new Sgd({ weightDecay: options.weightDecay, momentum: options.momentum });
    default:
      throw new ModelError('TANDEM_TRAIN_OPTION_INVALID', `unknown optimizer ${JSON.stringify(kind)}; choose one of ${OPTIMIZER_KINDS.join(', ')}`, { field: 'optimizer' });
  }
}
