// The worker thread of split inference (node:worker_threads): loads the served model once and
// keeps the middle's KV cache of each sequence, so that an InferStep's compute (a long prompt
// is seconds of it) never stops the node's event loop: heartbeats, REST and other tenants go on.
// The node's thread checks every step (position, context, budget) before it is sent here. A
// failure of the backend is reported and ends this worker; the node starts a fresh one, and
// the sequences it held start again at position 0.
import { parentPort, workerData } from 'node:worker_threads';
import { KvCache, LlamaModel, initBackend, loadModelFolder, tf } from '../../model/index.ts';

export interface InferenceWorkerStart {
  modelDir: string;
  /** tfjs backends to try in turn (the one the node's thread picked first). */
  backends: string[];
}

export type InferenceWorkerRequest =
  /** The middle blocks [start, end) on h_B [1, tokens, hidden] at `position` of sequence `seq` (0 starts it). */
  | { op: 'step'; req: number; seq: string; start: number; end: number; position: number; tokens: number; h: Float32Array }
  | { op: 'end'; seq: string };

export type InferenceWorkerReply =
  | { op: 'ready'; backend: string }
  | { op: 'stepped'; req: number; h: Float32Array }
  /** fatal: the backend failed and this worker ends. */
  | { op: 'failed'; req: number; message: string; fatal: boolean };

const port = parentPort;
if (port === null) throw new Error('split-inference-worker.ts runs as a worker thread');
const start = workerData as InferenceWorkerStart;

let backend: string | undefined;
let lastError: unknown;
for (const name of start.backends) {
  try {
    backend = (await initBackend({ backend: name })).name;
    break;
  } catch (error) {
    lastError = error;
  }
}
if (backend === undefined) throw lastError instanceof Error ? lastError : new Error('no tfjs backend started');
/** The blocks only (no embedding, norm or head: the edge runs those), the folder's arrays not kept beside the tensors. */
async function loadBlocks(): Promise<LlamaModel> {
  const loaded = await loadModelFolder(start.modelDir);
  return LlamaModel.fromArrays(loaded.config, loaded.weights, (name) => name.startsWith('model.layers.'));
}
const model = await loadBlocks();
const caches = new Map<string, KvCache>();

function end(seq: string): void {
  caches.get(seq)?.dispose();
  caches.delete(seq);
}

port.on('message', (m: InferenceWorkerRequest) => {
  if (m.op === 'end') {
    end(m.seq);
    return;
  }
  let cache = caches.get(m.seq);
  if (m.position === 0) {
    end(m.seq);
    cache = new KvCache();
    caches.set(m.seq, cache);
  }
  if (cache === undefined) {
    port.postMessage({ op: 'failed', req: m.req, message: `this worker holds no cache of sequence ${m.seq}`, fatal: false } satisfies InferenceWorkerReply);
    return;
  }
  try {
    const kept = cache;
    const out = tf.tidy(() => model.blocks(tf.tensor3d(m.h, [1, m.tokens, model.config.hiddenSize]), m.start, m.end, { cache: kept, positionOffset: m.position }));
    const data = out.dataSync() as Float32Array;
    out.dispose();
    // A buffer of its own, so that it can be transferred.
    const h = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
    port.postMessage({ op: 'stepped', req: m.req, h } satisfies InferenceWorkerReply, [h.buffer as ArrayBuffer]);
  } catch (error) {
    port.postMessage({ op: 'failed', req: m.req, message: error instanceof Error ? error.message : String(error), fatal: true } satisfies InferenceWorkerReply);
    process.exit(1);
  }
});
port.postMessage({ op: 'ready', backend } satisfies InferenceWorkerReply);
