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

/** y = x W^T + nothing else: x [n, in], W [out, in] (PyTorch's layout) → [n, out]. */
export const linear = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
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
