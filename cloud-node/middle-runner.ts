// What the session service asks of whatever runs the middle blocks: the compute workers of
// this process (MiddleExecutor) or the workers of a NATS cluster reached through a gateway
// (cluster/cluster-executor.ts). Both keep a forward's tape where it ran and free it on
// dispose; a backward whose tape is gone throws TapeLost, and the caller recomputes from h_B.
import type { TensorFrame } from '../protocol/index.ts';
import type { BlockRange, HeldLora, KeptTape, Shape3 } from './middle-executor.ts';

export type { BlockRange, KeptTape, Shape3 } from './middle-executor.ts';

/**
 * The frames an edge sent for a call's inputs, as received and validated: a runner that ships
 * tensors to another process (a cluster) may send these in place of the float32 values they
 * decode to; one that computes here ignores them.
 */
export interface InputFrames {
  h?: TensorFrame;
  g?: TensorFrame;
}

export interface MiddleRunner {
  /** Every compute worker this runner needs is up. */
  readonly ready: boolean;
  /** Compute workers (threads here, worker processes in a cluster). */
  readonly workers: number;
  /** Worker restarts since start. */
  readonly restarts: number;
  /** What computes: a tfjs backend's name, ort-cpu / ort-cuda, or `nats` for a cluster. */
  readonly backend: string;
  /** Requests waiting for a worker. */
  readonly queued: number;
  /** Requests computing now. */
  readonly running: number;
  /** h_B [batch, seq, hidden] → h_M. */
  forward(range: BlockRange, h: Float32Array, shape: Shape3, tenant?: string, frames?: InputFrames): Promise<Float32Array>;
  /** h_B → h_M, the worker that ran it keeping the tape for backwardFromTape. */
  forwardKeepingTape(range: BlockRange, h: Float32Array, shape: Shape3, tenant?: string, frames?: InputFrames): Promise<{ output: Float32Array; tape: KeptTape }>;
  /** g_M → g_B from a kept tape (which this frees); TapeLost when it is gone. */
  backwardFromTape(tape: KeptTape, g: Float32Array, shape: Shape3, tenant?: string, frames?: InputFrames): Promise<Float32Array>;
  /** g_M → g_B, recomputing the forward from h_B. */
  backward(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant?: string, frames?: InputFrames): Promise<Float32Array>;
  /** Whether forwardHeld and backwardHeld run (absent: no held middle adapters on this runner). */
  readonly holdsAdapters?: boolean;
  /** h_B → h_M with a session's held middle LoRA. */
  forwardHeld?(range: BlockRange, h: Float32Array, shape: Shape3, tenant: string, lora: HeldLora): Promise<Float32Array>;
  /** g_M → g_B with a session's held middle LoRA, and the gradients of its factors. */
  backwardHeld?(range: BlockRange, h: Float32Array, g: Float32Array, shape: Shape3, tenant: string, lora: HeldLora): Promise<{ output: Float32Array; loraGrads: Float32Array[] }>;
  /** Ends a worker as a crash would (operations and tests). */
  terminateWorker(index: number): Promise<void>;
  close(): Promise<void>;
}
