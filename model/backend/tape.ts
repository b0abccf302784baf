// The one gradient entry (`gradients`) and the forward whose tape outlives the call
// (`tapedForward`): both run tfjs's own backpropagation over a tape recorded here.
import { tf } from './tf.ts';

// A forward pass whose tape outlives the call, so that its vector-Jacobian product can be
// taken later: the cloud runs a micro-batch's middle forward when its Forward arrives and its
// backward when the Backward arrives, a network round trip later. tf.grads needs the forward
// and the backward in one synchronous call and would recompute the forward; this keeps what
// the forward saved for backward instead. It uses the engine's tape the way tf.grads does
// (startTape, endTape, the recorded nodes) and replays tfjs's own backpropagation.

interface TapeNode {
  id: number;
  kernelName: string;
  inputs: Record<string, tf.Tensor>;
  outputs: tf.Tensor[];
  gradient?: (dys: (tf.Tensor | null)[]) => Record<string, () => tf.Tensor>;
  saved?: tf.Tensor[];
}

interface EngineTape {
  startTape(): void;
  endTape(): void;
  tidy<T extends tf.TensorContainer>(name: string, f: () => T): T;
  state: { activeTape: TapeNode[] | null; gradientDepth: number };
}

/** A forward pass with its tape kept; `vjp` runs the backward once and frees the tape. */
export interface TapedForward {
  readonly output: tf.Tensor;
  /** Bytes the tape holds for backward. */
  readonly savedBytes: number;
  /** dL/dx for each x given to tapedForward, for dy = dL/d output. Frees the tape. */
  vjp(dy: tf.Tensor): tf.Tensor[];
  /** Frees the tape (and the output) without a backward. */
  dispose(): void;
}

/** Runs f recording a tape for a later vjp with respect to `xs`. Not for use inside tf.grads. */
export function tapedForward(f: () => tf.Tensor, xs: tf.Tensor[]): TapedForward {
  const { output, tape } = record(f);
  let open = true;
  const free = (): void => {
    if (!open) return;
    open = false;
    for (const node of tape) for (const t of node.saved ?? []) t.dispose();
    tape.length = 0;
  };
  let savedBytes = 0;
  for (const node of tape) for (const t of node.saved ?? []) savedBytes += t.size * 4;
  return {
    output,
    savedBytes,
    vjp(dy: tf.Tensor): tf.Tensor[] {
      if (!open) throw new Error('this forward pass was already used or freed');
      try {
        return tf.tidy(() => backpropagate(tape, xs, output, dy).map((g, i) => g ?? tf.zerosLike(xs[i])));
      } finally {
        free();
        output.dispose();
      }
    },
    dispose(): void {
      free();
      output.dispose();
    },
  };
}

/**
 * f's value and the gradients of it (or of <value, dy>) with respect to each x: undefined
 * where the value does not depend on x. Like tf.grads, but a gradient is freed as soon as
 * backward has used it, which halves the peak memory of a training step.
 */
export function gradients<T extends tf.Tensor>(f: () => T, xs: tf.Tensor[], dy?: tf.Tensor): { value: T; grads: (tf.Tensor | undefined)[] } {
  const engine = tf.engine() as unknown as EngineTape;
  if (engine.state.gradientDepth !== 0) {
    const { value, grads } = tf.engine().gradients(f, xs, dy, true);
    return { value: value as T, grads: grads.map((g) => g ?? undefined) };
  }
  const { output, tape } = record(f);
  try {
    let present: boolean[] = [];
    const reached = tf.tidy(() => {
      const all = backpropagate(tape, xs, output, dy ?? tf.onesLike(output));
      present = all.map((g) => g !== undefined);
      return all.filter((g): g is tf.Tensor => g !== undefined);
    });
    let k = 0;
    return { value: output as T, grads: present.map((p) => (p ? reached[k++] : undefined)) };
  } finally {
    for (const node of tape) for (const t of node.saved ?? []) t.dispose();
  }
}

/** Runs f under a fresh tape; the tape is detached from the engine afterwards. */
function record(f: () => tf.Tensor): { output: tf.Tensor; tape: TapeNode[] } {
  const engine = tf.engine() as unknown as EngineTape;
  if (engine.state.gradientDepth !== 0) throw new Error('tapedForward cannot run inside another gradient computation');
  engine.startTape();
  let output: tf.Tensor;
  let tape: TapeNode[];
  try {
    output = engine.tidy('forward', f);
  } finally {
    engine.endTape();
    tape = engine.state.activeTape ?? [];
    // Ops run from here on (other sessions) must not land on this tape.
    engine.state.activeTape = null;
  }
  return { output, tape };
}

/** tfjs's backpropagation over the part of a tape between xs and y (getFilteredNodesXToY, backpropagateGradients). */
function backpropagate(tape: TapeNode[], xs: tf.Tensor[], y: tf.Tensor, dy: tf.Tensor): (tf.Tensor | undefined)[] {
  const fromX = new Set(xs.map((x) => x.id));
  const nodesFromX = new Set<number>();
  for (const node of tape) {
    if (Object.values(node.inputs).some((t) => fromX.has(t.id))) {
      for (const o of node.outputs) fromX.add(o.id);
      nodesFromX.add(node.id);
    }
  }
  const toY = new Set([y.id]);
  const nodesToY = new Set<number>();
  for (let i = tape.length - 1; i >= 0; i--) {
    const node = tape[i];
    if (node.outputs.some((o) => toY.has(o.id))) {
      for (const t of Object.values(node.inputs)) toY.add(t.id);
      nodesToY.add(node.id);
    }
  }
  const wanted = new Set(xs.map((x) => x.id));
  const grads = new Map<number, tf.Tensor>([[y.id, dy]]);
  for (let i = tape.length - 1; i >= 0; i--) {
    const node = tape[i];
    if (!nodesFromX.has(node.id) || !nodesToY.has(node.id)) continue;
    if (!node.gradient) throw new Error(`no gradient registered for ${node.kernelName}`);
    const dys = node.outputs.map((o) => grads.get(o.id) ?? null);
    const inputGrads = node.gradient(dys);
    for (const [name, x] of Object.entries(node.inputs)) {
      if (!fromX.has(x.id)) continue;
      const dx = tf.tidy(() => inputGrads[name]());
      const prev = grads.get(x.id);
      if (prev) {
        grads.set(x.id, tf.add(prev, dx));
        prev.dispose();
        dx.dispose();
      } else {
        grads.set(x.id, dx);
      }
    }
    // Every consumer of this node's outputs came later on the tape, so their gradients are
    // complete and used: free them now (tfjs keeps them all to the end, doubling the peak).
    for (const o of node.outputs) {
      const g = grads.get(o.id);
      if (g && g !== dy && !wanted.has(o.id)) {
        g.dispose();
        grads.delete(o.id);
      }
    }
  }
  return xs.map((x) => grads.get(x.id));
}
