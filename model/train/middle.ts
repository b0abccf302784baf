// The middle of the model behind an interface, so one training loop serves local
// training (LocalMiddle over the same model or an emulator) and split mode (the remote
// middle edge-client provides, which talks to the cloud).
import { tf } from '../backend.ts';
import type { ForwardHooks } from '../hooks.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { gradientsOf, variablesReached } from './gradients.ts';

/** Names one micro-batch on the wire: every message about it carries this key. */
export interface MicrobatchKey {
  step: number;
  microbatch: number;
  /** Evaluation passes are forward-only and never followed by backward. */
  eval?: boolean;
  /** With a backward: this micro-batch's share of the step's loss, which the remote middle reports to the cloud (protocol v1.2). */
  loss?: number;
}

/** What the trainer hands a middle that holds parameters elsewhere at the end of a step. */
export interface StepCommitRequest {
  step: number;
  lr: number;
  /** 0: no clipping. */
  maxGradNorm: number;
  edgeGradSquareSum: number;
  microbatches: number;
}

export interface Middle {
  /**
   * h_B [batch, seq, hidden] → h_M. With `backward`, a backward for `key` follows and the
   * middle keeps (or can recompute) what it needs; without, nothing is kept.
   */
  forward(h: tf.Tensor3D, key: MicrobatchKey, backward: boolean): Promise<tf.Tensor3D>;
  /**
   * g_M = dL/dh_M → g_B = dL/dh_B for the micro-batch `key` went forward with. `labels` are the
   * micro-batch's private label rows, for an edge-side defense that needs them (Marvell); a
   * middle that sends anything anywhere ignores them.
   */
  backward(g: tf.Tensor3D, key: MicrobatchKey, labels?: readonly (readonly number[])[]): Promise<tf.Tensor3D>;
  /** True when the middle holds trainable parameters whose gradients need backward. */
  readonly trainsParameters: boolean;
  /**
   * A middle whose parameters are held elsewhere (an adapter the cloud holds) applies the
   * step's optimizer update to them here, with the learning rate and the edge's squared
   * gradient norm (clipping spans both sides); it answers its own squared gradient norm.
   */
  commitStep?(commit: StepCommitRequest): Promise<{ middleGradSquareSum: number }>;
  /** Gradients of the middle's own parameters accumulated by backward since the last call (local middles). */
  takeGradients?(): Map<string, tf.Tensor>;
  dispose?(): void;
}

/** The key as one string, for maps of what a middle keeps per micro-batch. */
export function keyString(key: MicrobatchKey): string {
  return `${key.eval ? 'eval' : 'train'}:${key.step}:${key.microbatch}`;
}

/** An adapter's random generators (dropout), rewound so a recomputation draws the masks the forward drew. */
export interface RandomState {
  randomState(): number[][];
  setRandomState(state: readonly (readonly number[])[]): void;
}

/** The adapter's generators when it exposes them (PEFT adapters do). */
export function randomStateOf(x: object): RandomState | undefined {
  const r = x as Partial<RandomState>;
  return typeof r.randomState === 'function' && typeof r.setRandomState === 'function' ? (r as RandomState) : undefined;
}

/** Runs f with the generators at `at`, then puts them back where they were. */
export function replaying<T>(random: RandomState | undefined, at: number[][] | undefined, f: () => T): T {
  if (!random || !at) return f();
  const now = random.randomState();
  random.setRandomState(at);
  try {
    return f();
  } finally {
    random.setRandomState(now);
  }
}

export interface LocalMiddleOptions {
  hooks?: ForwardHooks;
  /** The adapter's generators, so the recomputation in backward replays forward's dropout masks. */
  random?: RandomState;
  /** Trainable variables that may live in the middle (an adapter's); those the middle reaches get gradients. */
  trainable?: ReadonlyMap<string, tf.Variable>;
}

/**
 * Blocks [start, end) of a model held in this process. Forward runs without a tape and keeps
 * h_B; backward recomputes the blocks from h_B under a tape (what the cloud does after an
 * eviction) and returns the vector-Jacobian product.
 */
export class LocalMiddle implements Middle {
  readonly trainsParameters: boolean;
  private readonly kept = new Map<string, { h: tf.Tensor3D; random?: number[][] }>();
  private readonly params: Map<string, tf.Variable>;
  private grads = new Map<string, tf.Tensor>();

  constructor(
    private readonly model: LlamaModel,
    readonly start: number,
    readonly end: number,
    private readonly options: LocalMiddleOptions = {},
  ) {
    const trainable = options.trainable ?? new Map<string, tf.Variable>();
    let reached = new Set<string>();
    if (end > start && trainable.size > 0) {
      const probe = tf.zeros([1, 2, model.config.hiddenSize]) as tf.Tensor3D;
      reached = variablesReached(() => model.blocks(probe, start, end, { hooks: options.hooks, positionOffset: 0 }), trainable);
      probe.dispose();
    }
    this.params = new Map([...trainable].filter(([name]) => reached.has(name)));
    this.trainsParameters = this.params.size > 0;
  }

  private run(h: tf.Tensor3D, training: boolean): tf.Tensor3D {
    return this.model.blocks(h, this.start, this.end, { hooks: this.options.hooks, training, positionOffset: 0 });
  }

  async forward(h: tf.Tensor3D, key: MicrobatchKey, backward: boolean): Promise<tf.Tensor3D> {
    if (backward) {
      const k = keyString(key);
      this.kept.get(k)?.h.dispose();
      this.kept.set(k, { h: tf.keep(tf.clone(h)), random: this.options.random?.randomState() });
    }
    return this.run(h, !key.eval);
  }

  async backward(g: tf.Tensor3D, key: MicrobatchKey): Promise<tf.Tensor3D> {
    const k = keyString(key);
    const kept = this.kept.get(k);
    if (!kept) throw new Error(`LocalMiddle: no forward kept for ${k}`);
    this.kept.delete(k);
    const { h } = kept;
    const names = [...this.params.keys()];
    const { value, grads } = replaying(this.options.random, kept.random, () =>
      gradientsOf(() => this.run(h, true), [h, ...names.map((n) => this.params.get(n) as tf.Variable)], g),
    );
    value.dispose();
    const gB = (grads[0] ?? tf.zerosLike(h)) as tf.Tensor3D;
    h.dispose();
    names.forEach((name, i) => {
      const gi = grads[i + 1];
      if (!gi) return;
      const prev = this.grads.get(name);
      this.grads.set(name, prev ? tf.tidy(() => tf.add(prev, gi)) : gi);
      if (prev) {
        prev.dispose();
        gi.dispose();
      }
    });
    return gB;
  }

  takeGradients(): Map<string, tf.Tensor> {
    const out = this.grads;
    this.grads = new Map();
    return out;
  }

  dispose(): void {
    for (const t of this.kept.values()) t.h.dispose();
    this.kept.clear();
    for (const t of this.grads.values()) t.dispose();
    this.grads.clear();
  }
}
