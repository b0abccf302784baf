// Kernels the wasm backend lacks or implements wastefully, registered once by select.ts when
// the wasm backend is chosen.
import { tf } from './tf.ts';

let registered = false;

/** Kernels the wasm backend lacks, computed on the JS side of its heap. */
export function registerWasmFallbacks(): void {
  if (registered) return;
  registered = true;
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
