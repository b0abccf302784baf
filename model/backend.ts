// The one module that knows about tfjs backends, their registration and their quirks.
// Everything else imports `tf` from here, never from '@tensorflow/tfjs-*' directly.
// The union package: tfjs-core's Node build registers no gradients, the union's does
// (and brings the cpu backend). The native packages import this same package.
import * as tf from '@tensorflow/tfjs';
import { ModelError } from './errors.ts';

export { tf };

/** Backends best first; names are tfjs's own backend names except for the GPU build of tfjs-node. */
export const BACKENDS = ['tensorflow-gpu', 'tensorflow', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

const ALIASES: Record<string, BackendName> = {
  'tensorflow-gpu': 'tensorflow-gpu',
  'node-gpu': 'tensorflow-gpu',
  gpu: 'tensorflow-gpu',
  tensorflow: 'tensorflow',
  node: 'tensorflow',
  wasm: 'wasm',
  cpu: 'cpu',
};

export interface BackendChoice {
  name: BackendName;
  /** Backends tried before this one, with why each was passed over. */
  skipped: { name: BackendName; reason: string }[];
}

// PROD silences tfjs's console banners and skips its debug-only checks.
tf.env().set('PROD', true);

let active: BackendChoice | undefined;

/** Parses a backend name from a flag or TANDEM_BACKEND; 'auto' or undefined means best available. */
export function parseBackendName(value: string | undefined, field = '--backend'): BackendName | undefined {
  if (value === undefined || value === '' || value === 'auto') return undefined;
  const name = ALIASES[value];
  if (!name) {
    throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `unknown backend ${JSON.stringify(value)}; choose one of auto, ${BACKENDS.join(', ')}`, { field });
  }
  return name;
}

async function tryBackend(name: BackendName): Promise<void> {
  switch (name) {
    case 'tensorflow-gpu':
      // Both native packages register a backend called 'tensorflow' when imported.
      await import('@tensorflow/tfjs-node-gpu' as string);
      break;
    case 'tensorflow':
      await import('@tensorflow/tfjs-node' as string);
      break;
    case 'wasm':
      await import('@tensorflow/tfjs-backend-wasm');
      registerWasmFallbacks();
      break;
    case 'cpu':
      break;
  }
  const tfName = name === 'tensorflow-gpu' ? 'tensorflow' : name;
  if (!(await tf.setBackend(tfName))) throw new Error(`tf.setBackend('${tfName}') failed`);
  await tf.ready();
}

/**
 * Picks the compute backend: the one asked for (flag, then TANDEM_BACKEND), or the best that
 * loads, once per process. Asking for one that does not load is a typed error.
 */
export async function initBackend(options: { backend?: string; log?: (line: string) => void } = {}): Promise<BackendChoice> {
  const wanted = parseBackendName(options.backend ?? process.env.TANDEM_BACKEND, options.backend ? '--backend' : 'TANDEM_BACKEND');
  if (active && (wanted === undefined || wanted === active.name)) return active;
  const order = wanted ? [wanted] : [...BACKENDS];
  const skipped: BackendChoice['skipped'] = [];
  for (const name of order) {
    try {
      await tryBackend(name);
      active = { name, skipped };
      options.log?.(`backend: ${name}${skipped.length ? ` (skipped ${skipped.map((s) => s.name).join(', ')})` : ''}`);
      return active;
    } catch (err) {
      skipped.push({ name, reason: err instanceof Error ? err.message.split('\n')[0] : String(err) });
    }
  }
  throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `no backend could be started: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ')}`, {
    details: { skipped },
  });
}

/** The backend chosen by initBackend, or undefined before it ran. */
export function activeBackend(): BackendChoice | undefined {
  return active;
}

/**
 * Switches backends inside one process (tests compare backends). Production code calls
 * initBackend once at start instead.
 */
export async function useBackend(name: BackendName): Promise<void> {
  await tryBackend(name);
  active = { name, skipped: [] };
}

let wasmFallbacksRegistered = false;

/** Kernels the wasm backend lacks, computed on the JS side of its heap. */
function registerWasmFallbacks(): void {
  if (wasmFallbacksRegistered) return;
  wasmFallbacksRegistered = true;
  // The gradient of gather (the embedding lookup) is an UnsortedSegmentSum.
  if (!tf.getKernel('UnsortedSegmentSum', 'wasm')) {
    tf.registerKernel({ kernelName: 'UnsortedSegmentSum', backendName: 'wasm', kernelFunc: unsortedSegmentSumOnHeap });
  }
  // The gradient tape clones every tensor it saves for backward, and wasm's Identity copies
  // the bytes: a PEFT step on SmolLM-135M then held a second copy of the embedding and of
  // every activation. Tensors are immutable, so sharing the data (as the cpu backend does) is exact.
  tf.unregisterKernel('Identity', 'wasm');
  tf.registerKernel({ kernelName: 'Identity', backendName: 'wasm', kernelFunc: identitySharingData });
}

function identitySharingData(args: { inputs: tf.NamedTensorInfoMap; backend: unknown }): tf.TensorInfo {
  const x = args.inputs.x as tf.TensorInfo;
  (args.backend as { incRef(dataId: tf.DataId): void }).incRef(x.dataId);
  return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
}

interface HeapBackend {
  readSync(dataId: tf.DataId): ArrayLike<number>;
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  typedArrayFromHeap(info: tf.TensorInfo): Float32Array | Int32Array;
}

function unsortedSegmentSumOnHeap(args: { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap }): tf.TensorInfo {
  const backend = args.backend as HeapBackend;
  const x = args.inputs.x as tf.TensorInfo;
  const ids = args.inputs.segmentIds as tf.TensorInfo;
  const numSegments = Number(args.attrs?.numSegments);
  const xs = backend.readSync(x.dataId);
  const seg = backend.readSync(ids.dataId);
  const rows = ids.shape.reduce((a, b) => a * b, 1);
  const inner = rows === 0 ? 0 : xs.length / rows;
  const out = backend.makeOutput([numSegments, ...x.shape.slice(ids.shape.length)], x.dtype);
  const o = backend.typedArrayFromHeap(out);
  o.fill(0);
  for (let r = 0; r < rows; r++) {
    const s = seg[r];
    if (s < 0 || s >= numSegments) continue; // TensorFlow drops out-of-range segment ids.
    const src = r * inner;
    const dst = s * inner;
    for (let j = 0; j < inner; j++) o[dst + j] += xs[src + j];
  }
  return out;
}

// wasm's BatchMatMul is about ten times slower when asked to transpose an operand
// (XNNPACK gets a strided view it cannot pack) than on plain row-major operands, and the
// gradients tfjs registers for MatMul ask for exactly those transposes. These two ops
// transpose explicitly (cheap: activation-sized) and carry their own gradients, so forward
// and backward both run plain matmuls on every backend.

const swapLast = (t: tf.Tensor): tf.Tensor => {
  const perm = t.shape.map((_, i) => i);
  perm[perm.length - 1] = perm.length - 2;
  perm[perm.length - 2] = perm.length - 1;
  return tf.transpose(t, perm);
};

/** y = x W^T for a W that receives a gradient: x [n, in], W [out, in] (PyTorch's layout) → [n, out]. */
const trainedLinear = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [x, w, save] = args as [tf.Tensor2D, tf.Tensor2D, tf.GradSaveFunc];
  save([x, w]);
  return {
    value: tf.transpose(tf.matMul(w, tf.transpose(x))),
    gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => {
      const g = dy as tf.Tensor2D;
      const [xs, ws] = saved as [tf.Tensor2D, tf.Tensor2D];
      return [tf.matMul(g, ws), tf.matMul(tf.transpose(g) as tf.Tensor2D, xs)];
    },
  };
}) as (x: tf.Tensor2D, w: tf.Tensor2D) => tf.Tensor2D;

// A custom gradient computes the gradient of every input it is given, wanted or not; a
// frozen weight is therefore closed over rather than passed, so no [out, in] gradient is
// computed for it (that would double a PEFT step's backward).
const frozenLinears = new WeakMap<tf.Variable, (x: tf.Tensor2D) => tf.Tensor2D>();

function frozenLinear(w: tf.Variable): (x: tf.Tensor2D) => tf.Tensor2D {
  let f = frozenLinears.get(w);
  if (!f) {
    const w2 = w as tf.Tensor as tf.Tensor2D;
    f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
      const [x] = args as [tf.Tensor2D];
      return {
        value: tf.transpose(tf.matMul(w2, tf.transpose(x))),
        gradFunc: (dy: tf.Tensor | tf.Tensor[]) => [tf.matMul(dy as tf.Tensor2D, w2)],
      };
    }) as (x: tf.Tensor2D) => tf.Tensor2D;
    frozenLinears.set(w, f);
  }
  return f;
}

/**
 * y = x W^T: x [n, in], W [out, in] (PyTorch's layout) → [n, out]. A W that is a Variable
 * with trainable = false gets no gradient; any other W (trainable, or computed) does.
 */
export function linear(x: tf.Tensor, w: tf.Tensor): tf.Tensor2D {
  const x2 = x as tf.Tensor2D;
  return w instanceof tf.Variable && !w.trainable ? frozenLinear(w)(x2) : trainedLinear(x2, w as tf.Tensor2D);
}

/** Batched a @ b on plain operands, [..., m, k] @ [..., k, n], with a gradient of plain matmuls. */
export const batchMatMul = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [a, b, save] = args as [tf.Tensor3D, tf.Tensor3D, tf.GradSaveFunc];
  save([a, b]);
  return {
    value: tf.matMul(a, b),
    gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => {
      const g = dy as tf.Tensor3D;
      const [as, bs] = saved;
      return [tf.matMul(g, swapLast(bs) as tf.Tensor3D), tf.matMul(swapLast(as) as tf.Tensor3D, g)];
    },
  };
}) as (a: tf.Tensor3D, b: tf.Tensor3D) => tf.Tensor3D;

/** Swaps the last two axes. */
export function transposeLast<T extends tf.Tensor>(t: T): T {
  return swapLast(t) as T;
}

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

/** What a custom op computes: its value, the tensors its gradient needs, and the gradient of each input. */
export interface CustomOpResult {
  value: tf.Tensor;
  save?: tf.Tensor[];
  gradients: (dy: tf.Tensor, saved: tf.Tensor[]) => tf.Tensor[];
}

/**
 * An op with its own gradient, typed (tf.customGrad's own signature needs casts). The
 * gradient of every input is computed when backward reaches the op, so constants belong in
 * the closure, not among the inputs.
 */
export function customOp<A extends tf.Tensor[]>(f: (...inputs: A) => CustomOpResult): (...inputs: A) => tf.Tensor {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const result = f(...(args.slice(0, -1) as A));
    save(result.save ?? []);
    return { value: result.value, gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => result.gradients(dy as tf.Tensor, saved) };
  });
  return (...inputs: A) => op(...inputs) as tf.Tensor;
}
