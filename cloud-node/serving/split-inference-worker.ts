// The worker thread of split inference (node:worker_threads): loads the served model's blocks
// once (on ONNX Runtime when the node's middle runs on it, else tfjs) and keeps the middle's KV
// cache of each sequence, so that an InferStep's compute (a long prompt is seconds of it)
// never stops the node's event loop: heartbeats, REST and other tenants go on.
// The node's thread checks every step (position, context, budget) before it is sent here. A
// failure of the backend is reported and ends this worker; the node starts a fresh one, and
// the sequences it held start again at position 0.
import { parentPort, workerData } from 'node:worker_threads';
import { KvCache, LlamaModel, OrtKvCache, OrtLlama, initFirstBackend, loadModelFolder, selectEngine, tf } from '../../model/index.ts';

export interface InferenceWorkerStart {
  modelDir: string;
  /** tfjs backends to try in turn (the one the node's thread picked first). */
  backends: string[];
  /** ONNX Runtime for the middle (the node's engine); tfjs on `backends` otherwise. */
  engine?: 'ort-cpu' | 'ort-cuda';
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

const backend = await initFirstBackend(start.backends);
/** One sequence's middle: the next positions' h_B at `position` → their h_M, the cache growing. */
interface Middle {
  step(seq: string, start: number, end: number, position: number, tokens: number, h: Float32Array): Promise<Float32Array>;
  end(seq: string): void;
}

/** The blocks only (no embedding, norm or head: the edge runs those), the folder's arrays not kept beside what computes. */
async function startMiddle(): Promise<Middle> {
  const loaded = await loadModelFolder(start.modelDir);
  const blocks = new Map([...loaded.weights].filter(([name]) => name.startsWith('model.layers.')));
  if (start.engine !== undefined) {
    const choice = await selectEngine({ engine: start.engine });
    const engine = await OrtLlama.create(loaded.config, blocks, { threads: choice.threads, provider: choice.ortProvider });
    const caches = new Map<string, OrtKvCache>();
    return {
      async step(seq, from, to, position, tokens, h) {
        let cache = caches.get(seq);
        if (position === 0 || cache === undefined) {
          if (position !== 0) throw new Error(`this worker holds no cache of sequence ${seq}`);
          cache = new OrtKvCache();
          caches.set(seq, cache);
        }
        return engine.blocksCached(h, 1, tokens, from, to, cache);
      },
      end: (seq) => caches.delete(seq),
    };
  }
  const model = LlamaModel.fromArrays(loaded.config, blocks);
  const caches = new Map<string, KvCache>();
  const end = (seq: string): void => {
    caches.get(seq)?.dispose();
    caches.delete(seq);
  };
  return {
    async step(seq, from, to, position, tokens, h) {
      if (position === 0) {
        end(seq);
        caches.set(seq, new KvCache());
      }
      const cache = caches.get(seq);
      if (cache === undefined) throw new Error(`this worker holds no cache of sequence ${seq}`);
      const out = tf.tidy(() => model.blocks(tf.tensor3d(h, [1, tokens, model.config.hiddenSize]), from, to, { cache, positionOffset: position }));
      const data = out.dataSync() as Float32Array;
      out.dispose();
      return data;
    },
    end,
  };
}
const middle = await startMiddle();

port.on('message', (m: InferenceWorkerRequest) => {
  if (m.op === 'end') {
    middle.end(m.seq);
    return;
  }
  middle.step(m.seq, m.start, m.end, m.position, m.tokens, m.h).then((data) => {
    // A buffer of its own, so that it can be transferred.
    const h = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
    port.postMessage({ op: 'stepped', req: m.req, h } satisfies InferenceWorkerReply, [h.buffer as ArrayBuffer]);
  }, (error: unknown) => {
    port.postMessage({ op: 'failed', req: m.req, message: error instanceof Error ? error.message : String(error), fatal: true } satisfies InferenceWorkerReply);
    process.exit(1);
  });
});
port.postMessage({ op: 'ready', backend: start.engine ?? backend } satisfies InferenceWorkerReply);
