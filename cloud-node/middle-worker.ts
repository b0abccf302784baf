// A compute worker (node:worker_threads): loads the served model once, runs the middle for
// the node's executor and keeps the tapes of its forwards. Requests arrive one at a time.
// Any failure of a computation (inputs were validated on the event loop, so this is the
// backend: a wasm abort, an allocation that failed) is reported and then ends this worker,
// which the executor restarts: a backend is never left half-broken.
import { parentPort, workerData } from 'node:worker_threads';
import { LlamaModel, OrtLlama, initBackend, loadModelFolder, selectEngine, tf } from '../model/index.ts';
import { MiddleCompute, OrtMiddleCompute } from './middle-compute.ts';
import type { BlockRange, Compute, Kept, Shape3 } from './middle-compute.ts';

export interface WorkerStart {
  modelDir: string;
  backend?: string;
  /** An ONNX Runtime engine (ort-cpu, ort-cuda) for the middle; tfjs on `backend` otherwise. */
  engine?: 'ort-cpu' | 'ort-cuda';
  /** ORT intra-op threads (the machine's cores by default). */
  threads?: number;
}

export type WorkerRequest =
  | { id: number; op: 'forward'; range: BlockRange; h: Float32Array; shape: Shape3; keepTape: boolean }
  | { id: number; op: 'backwardFromTape'; tapeId: number; g: Float32Array; shape: Shape3 }
  | { id: number; op: 'backward'; range: BlockRange; h: Float32Array; g: Float32Array; shape: Shape3 }
  | { id: 0; op: 'dropTape'; tapeId: number };

export type WorkerMessage =
  | { type: 'ready'; backend: string }
  | { type: 'result'; id: number; output: Float32Array; tapeId?: number; savedBytes?: number }
  /** fatal: the backend failed and this worker ends; otherwise a request the worker could not serve (a tape it does not keep). */
  | { type: 'failed'; id: number; message: string; name: string; fatal: boolean };

class TapeUnknown extends Error {}

const port = parentPort;
if (port === null) throw new Error('middle-worker.ts runs as a worker thread');
const start = workerData as WorkerStart;

/** A buffer of its own, so that it can be transferred. */
function own(data: Float32Array): Float32Array {
  return data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
}

const loaded = await loadModelFolder(start.modelDir);
let backendName: string;
let compute: Compute;
if (start.engine !== undefined) {
  // The tfjs backend the node's thread picked first (a native one may not load in a worker);
  // selectEngine then probes the ORT provider (CUDA is checked here, not at the first request).
  await initBackend({ backend: start.backend });
  const choice = await selectEngine({ engine: start.engine, threads: start.threads });
  const engine = await OrtLlama.create(loaded.config, loaded.weights, { threads: choice.threads, provider: choice.ortProvider });
  compute = new OrtMiddleCompute(engine) as Compute;
  backendName = choice.name;
} else {
  const backend = await initBackend({ backend: start.backend });
  compute = new MiddleCompute(LlamaModel.fromArrays(loaded.config, loaded.weights)) as Compute;
  backendName = backend.name;
}
const tapes = new Map<number, Kept>();
let nextTape = 1;

async function run(request: Exclude<WorkerRequest, { op: 'dropTape' }>): Promise<WorkerMessage> {
  switch (request.op) {
    case 'forward': {
      if (!request.keepTape) return { type: 'result', id: request.id, output: await compute.forward(request.range, request.h, request.shape) };
      const { output, tape } = await compute.forwardKeepingTape(request.range, request.h, request.shape);
      const tapeId = nextTape++;
      tapes.set(tapeId, tape);
      return { type: 'result', id: request.id, output, tapeId, savedBytes: tape.savedBytes };
    }
    case 'backwardFromTape': {
      const tape = tapes.get(request.tapeId);
      if (tape === undefined) throw new TapeUnknown(`tape ${request.tapeId} is not kept by this worker`);
      tapes.delete(request.tapeId);
      return { type: 'result', id: request.id, output: await compute.backwardFromTape(tape, request.g, request.shape) };
    }
    case 'backward':
      return { type: 'result', id: request.id, output: await compute.backward(request.range, request.h, request.g, request.shape) };
  }
}

port.on('message', (request: WorkerRequest) => {
  if (request.op === 'dropTape') {
    tapes.get(request.tapeId)?.dispose();
    tapes.delete(request.tapeId);
    return;
  }
  run(request).then(
    (reply) => {
      if (reply.type === 'result') {
        const output = own(reply.output);
        port.postMessage({ ...reply, output }, [output.buffer as ArrayBuffer]);
      }
    },
    (error: unknown) => {
      const err = error instanceof Error ? error : new Error(String(error));
      const fatal = !(error instanceof TapeUnknown);
      port.postMessage({ type: 'failed', id: request.id, message: err.message, name: err.name, fatal } satisfies WorkerMessage);
      if (!fatal) return;
      // The backend may be broken: end here and let the executor start a fresh worker.
      for (const tape of tapes.values()) tape.dispose();
      tf.disposeVariables();
      process.exit(70);
    },
  );
});

port.postMessage({ type: 'ready', backend: backendName } satisfies WorkerMessage);
