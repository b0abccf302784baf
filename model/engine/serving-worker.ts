// The worker thread of ServingThread: one OrtServingEngine, its sequences and the adapters'
// stacked LoRA factors, driven by messages (serving-thread.ts), so that ONNX Runtime's
// synchronous runs leave the node's event loop free.
import { parentPort, workerData } from 'node:worker_threads';
import type { ModelConfig } from '../config.ts';
import { ModelError } from '../errors.ts';
import type { LoraSpec } from './llama-graphs.ts';
import type { OrtProvider } from './ort-llama.ts';
import { OrtServingEngine, ServingLora } from './serving-engine.ts';
import type { ServingSequence } from './serving-engine.ts';

export interface ServingWorkerStart {
  config: ModelConfig;
  weights: [string, number[], Float32Array][];
  threads?: number;
  provider?: OrtProvider;
}

export type ServingWorkerMessage =
  | { op: 'lora'; id: number; spec: LoraSpec; factors: [string, Float32Array, Float32Array][] }
  | { op: 'drop-lora'; id: number }
  | { op: 'open'; seq: number; capacity: number; lora?: number }
  | { op: 'free'; seq: number }
  | { op: 'step'; req: number; rows: { seq: number; ids: number[] }[] };

export type ServingWorkerReply =
  | { op: 'ready' }
  | { op: 'init-failed'; message: string }
  | { op: 'stepped'; req: number; logits: Float32Array[]; timings: OrtServingEngine['timings'] }
  | { op: 'failed'; req: number; message: string; code?: string };

const port = parentPort;
if (port === null) throw new Error('serving-worker.ts runs as a worker thread');
const start = workerData as ServingWorkerStart;
const post = (m: ServingWorkerReply, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);

try {
  const weights = new Map(start.weights.map(([name, shape, data]) => [name, { shape, data }]));
  const engine = await OrtServingEngine.create(start.config, weights, { threads: start.threads, provider: start.provider });
  const loras = new Map<number, ServingLora>();
  const sequences = new Map<number, ServingSequence>();
  port.on('message', (m: ServingWorkerMessage) => {
    switch (m.op) {
      case 'lora': {
        // The factors arrive scaled already: scaling 1 keeps them as they are.
        const params = new Map(m.factors.map(([path, a, b]) => [path, { a, b }]));
        loras.set(m.id, new ServingLora(start.config, { ...m.spec, scaling: 1 }, params));
        return;
      }
      case 'drop-lora':
        loras.delete(m.id);
        return;
      case 'open':
        sequences.set(m.seq, engine.sequence(m.capacity, m.lora === undefined ? undefined : loras.get(m.lora)));
        return;
      case 'free':
        sequences.delete(m.seq);
        return;
      case 'step': {
        const fail = (err: unknown): void => {
          const e = err as { message?: string; code?: string };
          post({ op: 'failed', req: m.req, message: e.message ?? String(err), code: e.code });
        };
        const rows: { ids: number[]; sequence: ServingSequence }[] = [];
        for (const r of m.rows) {
          const sequence = sequences.get(r.seq);
          if (sequence === undefined) return fail(new ModelError('TANDEM_INPUT_INVALID', `sequence ${r.seq} is not open`, { field: 'sequence' }));
          rows.push({ ids: r.ids, sequence });
        }
        engine.step(rows).then(
          (logits) => post({ op: 'stepped', req: m.req, logits, timings: { ...engine.timings } }, logits.map((l) => l.buffer as ArrayBuffer)),
          fail,
        );
      }
    }
  });
  post({ op: 'ready' });
} catch (err) {
  post({ op: 'init-failed', message: err instanceof Error ? err.message : String(err) });
}
