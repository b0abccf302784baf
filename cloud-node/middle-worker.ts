// A compute worker (node:worker_threads): loads the served model once, runs the middle for
// the node's executor and keeps the tapes of its forwards. Requests arrive one batch at a time.
// Any failure of a computation (inputs were validated on the event loop, so this is the
// backend: a wasm abort, an allocation that failed) is reported and then ends this worker,
// which the executor restarts: a backend is never left half-broken.
import { parentPort, workerData } from 'node:worker_threads';
import { LlamaModel, OrtLlama, initBackend, loadModelFolder, selectEngine, tf } from '../model/index.ts';
import { MiddleCompute, OrtMiddleCompute } from './middle-compute.ts';
import type { BatchItem, Compute, Kept, Shape3 } from './middle-compute.ts';

export interface WorkerStart {
  modelDir: string;
  backend?: string;
  /** An ONNX Runtime engine (ort-cpu, ort-cuda) for the middle; tfjs on `backend` otherwise. */
  engine?: 'ort-cpu' | 'ort-cuda';
  /** ORT intra-op threads (the machine's cores by default). */
  threads?: number;
}

/**
 * A batch of requests of one kind, computed in one backbone pass when the compute packs
 * (tfjs), else one by one. A forward keeping its tape keeps one tape for the whole batch;
 * its members are the batch's requests, in order.
 */
export type WorkerRequest =
  | { id: number; op: 'forward'; items: BatchItem[]; keepTape: boolean }
  | { id: number; op: 'backwardFromTape'; tapeId: number; members: number[]; gs: Float32Array[]; shapes: Shape3[] }
  | { id: number; op: 'backward'; items: BatchItem[] }
  | { id: 0; op: 'dropTape'; tapeId: number; member: number };

export type WorkerMessage =
  | { type: 'ready'; backend: string }
  /**
   * outputs: one per item (per member for a backwardFromTape). A kept tape: its id, bytes,
   * and `perMember` when each member has a tape of its own (one backward each); a packed
   * tape serves one backward for all its members.
   */
  | { type: 'result'; id: number; outputs: Float32Array[]; tapeId?: number; savedBytes?: number; perMember?: boolean; loraGrads?: (Float32Array[] | undefined)[] }
  /** fatal: the backend failed and this worker ends; otherwise a request the worker could not serve (a tape it does not keep). */
  | { type: 'failed'; id: number; message: string; name: string; fatal: boolean };

/** A kept tape: one packed for all members, or one per member. */
type KeptEntry = { packed: Kept; live: Set<number> } | { each: (Kept | undefined)[] };

class TapeUnknown extends Error {}

const port = parentPort;
if (port === null) throw new Error('middle-worker.ts runs as a worker thread');
const start = workerData as WorkerStart;

/** A buffer of its own, so that it can be transferred. */
function own(data: Float32Array): Float32Array {
  return data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
}

/**
 * The compute over the served model. The arrays the folder is read into are not kept at module
 * scope: on tfjs the model's tensors are its copy (the arrays go), on ORT the engine keeps them
 * for the graphs it builds on demand.
 */
async function startCompute(): Promise<{ compute: Compute; backendName: string }> {
  const loaded = await loadModelFolder(start.modelDir);
  if (start.engine !== undefined) {
    // The tfjs backend the node's thread picked first (a native one may not load in a worker);
    // selectEngine then probes the ORT provider (CUDA is checked here, not at the first request).
    await initBackend({ backend: start.backend });
    const choice = await selectEngine({ engine: start.engine, threads: start.threads });
    const engine = await OrtLlama.create(loaded.config, loaded.weights, { threads: choice.threads, provider: choice.ortProvider });
    return { compute: new OrtMiddleCompute(engine) as Compute, backendName: choice.name };
  }
  const backend = await initBackend({ backend: start.backend });
  return { compute: new MiddleCompute(LlamaModel.fromArrays(loaded.config, loaded.weights)) as Compute, backendName: backend.name };
}
const { compute, backendName } = await startCompute();
const tapes = new Map<number, KeptEntry>();
let nextTape = 1;

async function forward(request: Extract<WorkerRequest, { op: 'forward' }>): Promise<WorkerMessage> {
  const { id, items, keepTape } = request;
  if (items.some((it) => it.lora !== undefined)) {
    // Held LoRAs never keep a tape: their backward recomputes from h_B with the factors it is given.
    if (compute.forwardHeld === undefined) throw new TapeUnknown('this compute runs no held adapters');
    return { type: 'result', id, outputs: await compute.forwardHeld(items) };
  }
  if (items.length > 1 && compute.forwardPacked !== undefined && (compute.canPack?.(items) ?? true)) {
    const { outputs, tape } = await compute.forwardPacked(items, keepTape);
    if (tape === undefined) return { type: 'result', id, outputs };
    const tapeId = nextTape++;
    tapes.set(tapeId, { packed: tape, live: new Set(items.map((_, k) => k)) });
    return { type: 'result', id, outputs, tapeId, savedBytes: tape.savedBytes, perMember: false };
  }
  const outputs: Float32Array[] = [];
  if (!keepTape) {
    for (const it of items) outputs.push(await compute.forward(it.range, it.h, it.shape));
    return { type: 'result', id, outputs };
  }
  const each: Kept[] = [];
  try {
    for (const it of items) {
      const { output, tape } = await compute.forwardKeepingTape(it.range, it.h, it.shape);
      outputs.push(output);
      each.push(tape);
    }
  } catch (err) {
    for (const t of each) t.dispose();
    throw err;
  }
  const tapeId = nextTape++;
  tapes.set(tapeId, { each });
  return { type: 'result', id, outputs, tapeId, savedBytes: each.reduce((n, t) => n + t.savedBytes, 0), perMember: true };
}

async function backwardFromTape(request: Extract<WorkerRequest, { op: 'backwardFromTape' }>): Promise<WorkerMessage> {
  const entry = tapes.get(request.tapeId);
  if (entry === undefined) throw new TapeUnknown(`tape ${request.tapeId} is not kept by this worker`);
  if ('packed' in entry) {
    tapes.delete(request.tapeId);
    const gs: (Float32Array | undefined)[] = [];
    request.members.forEach((m, k) => { gs[m] = request.gs[k]; });
    const all = compute.backwardPackedFromTape === undefined ? undefined : await compute.backwardPackedFromTape(entry.packed, gs);
    if (all === undefined) throw new TapeUnknown('this compute does not keep packed tapes');
    return { type: 'result', id: request.id, outputs: request.members.map((m) => all[m]) };
  }
  const outputs: Float32Array[] = [];
  for (const [k, m] of request.members.entries()) {
    const tape = entry.each[m];
    if (tape === undefined) throw new TapeUnknown(`member ${m} of tape ${request.tapeId} is not kept by this worker`);
    entry.each[m] = undefined;
    outputs.push(await compute.backwardFromTape(tape, request.gs[k], request.shapes[k]));
  }
  if (entry.each.every((t) => t === undefined)) tapes.delete(request.tapeId);
  return { type: 'result', id: request.id, outputs };
}

async function backward(request: Extract<WorkerRequest, { op: 'backward' }>): Promise<WorkerMessage> {
  const { id, items } = request;
  if (items.some((it) => it.lora !== undefined)) {
    if (compute.backwardHeld === undefined) throw new TapeUnknown('this compute runs no held adapters');
    const { gs, loraGrads } = await compute.backwardHeld(items);
    return { type: 'result', id, outputs: gs, loraGrads };
  }
  if (items.length > 1 && compute.backwardPacked !== undefined && (compute.canPack?.(items) ?? true)) return { type: 'result', id, outputs: await compute.backwardPacked(items) };
  const outputs: Float32Array[] = [];
  for (const it of items) outputs.push(await compute.backward(it.range, it.h, it.g ?? new Float32Array(it.h.length), it.shape));
  return { type: 'result', id, outputs };
}

function run(request: Exclude<WorkerRequest, { op: 'dropTape' }>): Promise<WorkerMessage> {
  switch (request.op) {
    case 'forward':
      return forward(request);
    case 'backwardFromTape':
      return backwardFromTape(request);
    case 'backward':
      return backward(request);
  }
}

function dropTape(tapeId: number, member: number): void {
  const entry = tapes.get(tapeId);
  if (entry === undefined) return;
  if ('packed' in entry) {
    entry.live.delete(member);
    if (entry.live.size > 0) return;
    entry.packed.dispose();
  } else {
    entry.each[member]?.dispose();
    entry.each[member] = undefined;
    if (entry.each.some((t) => t !== undefined)) return;
  }
  tapes.delete(tapeId);
}

function disposeAll(): void {
  for (const entry of tapes.values()) {
    if ('packed' in entry) entry.packed.dispose();
    else for (const t of entry.each) t?.dispose();
  }
  tapes.clear();
}

port.on('message', (request: WorkerRequest) => {
  if (request.op === 'dropTape') {
    dropTape(request.tapeId, request.member);
    return;
  }
  run(request).then(
    (reply) => {
      if (reply.type === 'result') {
        const outputs = reply.outputs.map(own);
        port.postMessage({ ...reply, outputs }, outputs.map((o) => o.buffer as ArrayBuffer));
      }
    },
    (error: unknown) => {
      const err = error instanceof Error ? error : new Error(String(error));
      const fatal = !(error instanceof TapeUnknown);
      port.postMessage({ type: 'failed', id: request.id, message: err.message, name: err.name, fatal } satisfies WorkerMessage);
      if (!fatal) return;
      // The backend may be broken: end here and let the executor start a fresh worker.
      disposeAll();
      tf.disposeVariables();
      process.exit(70);
    },
  );
});

port.postMessage({ type: 'ready', backend: backendName } satisfies WorkerMessage);
