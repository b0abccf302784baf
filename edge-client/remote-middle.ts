// model/train's Middle over the wire: forward sends h_B and gets h_M, backward sends g_M
// and gets g_B. The encoded h_B frame is kept until backward completes, because the cloud
// may have lost its activations (eviction, restart) and then needs h_B again to recompute;
// resending the very frame makes the recomputation see exactly what forward saw.
import { ErrorFeedback, WIRE_ERRORS, decodeTensor, encodeTensor, frameBytes } from '../protocol/index.ts';
import type { Body, CodecSpec, Envelope, TensorFrame, Welcome } from '../protocol/index.ts';
import { keyString, tf } from '../model/index.ts';
import type { Middle, MicrobatchKey, StepCommitRequest } from '../model/index.ts';
import { EdgeError } from './errors.ts';

/** What the remote middle needs of a session: its id, what was negotiated, and requests. */
export interface MiddleChannel {
  /** The session's id now (a reopened session has a new one). */
  readonly id: string;
  /** The Welcome in force: codecs, limits. */
  readonly welcome: Welcome;
  /** Sends a request of the session and returns the reply; a cloud error is EdgeError with `remoteCode`. */
  request(body: Body): Promise<Envelope>;
}

export interface RemoteMiddleOptions {
  /** Error feedback on the gradient codec; on by default when it is lossy. */
  errorFeedback?: boolean;
  /** The cloud holds a middle adapter for the session (protocol 1.3): every step ends with a StepCommit. */
  heldAdapter?: boolean;
}

/** Bytes of tensor frames per direction and message kind (payload and codec parameters). */
export interface MiddleTraffic {
  forwardUpBytes: number;
  forwardDownBytes: number;
  backwardUpBytes: number;
  backwardDownBytes: number;
  forwards: number;
  backwards: number;
  /** Backwards the cloud answered by recomputing from a resent h_B. */
  recomputes: number;
  /** Milliseconds from sending each Forward and Backward to its reply, all together: what training waited on the cloud's compute and the wire. */
  waitMs: number;
}

const LOSSLESS = new Set(['f32']);

export class RemoteMiddle implements Middle {
  readonly trainsParameters: boolean;
  readonly commitStep?: (commit: StepCommitRequest) => Promise<{ middleGradSquareSum: number }>;
  /** The last step the cloud committed for the held adapter. */
  private lastCommitted?: number;
  readonly traffic: MiddleTraffic = { forwardUpBytes: 0, forwardDownBytes: 0, backwardUpBytes: 0, backwardDownBytes: 0, forwards: 0, backwards: 0, recomputes: 0, waitMs: 0 };
  private readonly kept = new Map<string, TensorFrame>();
  private readonly feedback?: ErrorFeedback;
  private evalCounter = 0;

  constructor(
    private readonly session: MiddleChannel,
    options: RemoteMiddleOptions = {},
  ) {
    this.trainsParameters = options.heldAdapter ?? false;
    if (options.heldAdapter) this.commitStep = async (c) => ({ middleGradSquareSum: (await this.commit(c, false)).middleGradSquareSum });
    const backward = this.backwardCodec;
    if (options.errorFeedback ?? !LOSSLESS.has(backward.codec)) this.feedback = new ErrorFeedback(backward);
  }

  get forwardCodec(): CodecSpec {
    return this.session.welcome.codecs.forward;
  }

  get backwardCodec(): CodecSpec {
    return this.session.welcome.codecs.backward;
  }

  private decode(reply: Envelope, expected: 'forwardResult' | 'backwardResult', key: MicrobatchKey, shape: number[]): { data: Float32Array; bytes: number; recomputed: boolean } {
    if (reply.body.case !== expected) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `expected ${expected}, got ${reply.body.case}`, { field: expected });
    const v = reply.body.value;
    if (v.sessionId !== this.session.id) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the reply is for session ${JSON.stringify(v.sessionId.slice(0, 80))}, not ${this.session.id}`, { field: `${expected}.session_id` });
    if (v.step !== key.step || v.microbatch !== key.microbatch) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the reply is for (${v.step}, ${v.microbatch}), the request for (${key.step}, ${key.microbatch})`, { field: `${expected}.step` });
    }
    const frame = v.frames[0];
    if (!frame) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the reply carries no tensor frame', { field: `${expected}.frames` });
    const w = this.session.welcome;
    const data = decodeTensor(frame, { shape, limits: w.limits, allowNonFinite: w.allowNonFinite, field: `${expected}.frames[0]` });
    const recomputed = reply.body.case === 'backwardResult' ? reply.body.value.recomputed : false;
    return { data, bytes: frameBytes(frame), recomputed };
  }

  async forward(h: tf.Tensor3D, key: MicrobatchKey, backward: boolean): Promise<tf.Tensor3D> {
    const shape = [...h.shape];
    const data = (await h.data()) as Float32Array;
    const frame = encodeTensor(data, shape, this.forwardCodec, { name: 'h_B', checkFinite: true });
    const needsBackward = !key.eval && backward;
    // Eval passes are keyed apart from training steps: a distinct micro-batch number each.
    const wireKey = key.eval ? { step: key.step, microbatch: 0x40000000 + (this.evalCounter++ % 0x3fffffff) } : key;
    if (needsBackward) this.kept.set(keyString(key), frame);
    this.traffic.forwards += 1;
    this.traffic.forwardUpBytes += frameBytes(frame);
    const sent = performance.now();
    const reply = await this.session.request({
      case: 'forward',
      value: { sessionId: this.session.id, step: wireKey.step, microbatch: wireKey.microbatch, frames: [frame], needsBackward },
    });
    this.traffic.waitMs += performance.now() - sent;
    const out = this.decode(reply, 'forwardResult', wireKey, shape);
    this.traffic.forwardDownBytes += out.bytes;
    return tf.tensor3d(out.data, shape as [number, number, number]);
  }

  async backward(g: tf.Tensor3D, key: MicrobatchKey): Promise<tf.Tensor3D> {
    const k = keyString(key);
    const hB = this.kept.get(k);
    if (!hB) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `backward for ${k} without a forward that kept h_B`, { field: 'key' });
    const shape = [...g.shape];
    const data = (await g.data()) as Float32Array;
    const stream = `g_M:${key.microbatch}`;
    if (this.feedback?.residual(stream)?.length !== undefined && this.feedback.residual(stream)?.length !== data.length) this.feedback.reset(stream);
    const gFrame = this.feedback ? this.feedback.encode(stream, data, shape, { name: 'g_M' }) : encodeTensor(data, shape, this.backwardCodec, { name: 'g_M', checkFinite: true });
    const send = (frames: TensorFrame[]) => {
      this.traffic.backwards += 1;
      this.traffic.backwardUpBytes += frames.reduce((n, f) => n + frameBytes(f), 0);
      return this.session.request({ case: 'backward', value: { sessionId: this.session.id, step: key.step, microbatch: key.microbatch, frames, loss: key.loss } });
    };
    let reply: Envelope;
    const sent = performance.now();
    try {
      reply = await send([gFrame]);
    } catch (err) {
      if (!(err instanceof EdgeError) || err.remoteCode !== WIRE_ERRORS.activationsGone) throw err;
      reply = await send([gFrame, hB]);
    } finally {
      this.traffic.waitMs += performance.now() - sent;
    }
    const out = this.decode(reply, 'backwardResult', key, shape);
    if (out.recomputed) this.traffic.recomputes += 1;
    this.traffic.backwardDownBytes += out.bytes;
    this.kept.delete(k);
    return tf.tensor3d(out.data, shape as [number, number, number]);
  }

  /** StepCommit → StepCommitted; retried like any request, which the cloud answers the same. */
  private async commit(c: StepCommitRequest, exportAdapter: boolean): Promise<{ middleGradSquareSum: number; frames: TensorFrame[] }> {
    const reply = await this.session.request({
      case: 'stepCommit',
      value: { sessionId: this.session.id, step: c.step, lr: c.lr, maxGradNorm: c.maxGradNorm, edgeGradSquareSum: c.edgeGradSquareSum, microbatches: c.microbatches, exportAdapter },
    });
    if (reply.body.case !== 'stepCommitted' || reply.body.value.step !== c.step) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `StepCommit of step ${c.step} was answered by ${reply.body.case}`, { field: 'stepCommitted' });
    }
    const sq = reply.body.value.middleGradSquareSum;
    if (!Number.isFinite(sq) || sq < 0) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the middle\'s squared gradient norm is not a finite number >= 0', { field: 'stepCommitted.middle_grad_square_sum' });
    this.lastCommitted = c.step;
    return { middleGradSquareSum: sq, frames: reply.body.value.frames };
  }

  /**
   * The held middle adapter's tensors by PEFT key, as the cloud holds them after the last
   * committed step: exactly the tensors of `layout` (middleAdapterLayout), each of its shape.
   */
  async exportAdapter(layout: ReadonlyMap<string, readonly number[]>): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
    if (!this.trainsParameters || this.lastCommitted === undefined) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'no middle adapter held by the cloud has been trained in this session', { field: 'middleLora' });
    const { frames } = await this.commit({ step: this.lastCommitted, lr: 0, maxGradNorm: 0, edgeGradSquareSum: 0, microbatches: 0 }, true);
    const w = this.session.welcome;
    const out = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const [i, f] of frames.entries()) {
      const shape = layout.get(f.name);
      if (shape === undefined || out.has(f.name)) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `middle adapter tensor ${JSON.stringify(f.name.slice(0, 120))} is not ${shape === undefined ? 'one of the adapter the session asked for' : 'new'}`, { field: `stepCommitted.frames[${i}]` });
      out.set(f.name, { shape: [...shape], data: decodeTensor(f, { shape: [...shape], limits: w.limits, allowNonFinite: false, field: `stepCommitted.frames[${i}]` }).slice() });
    }
    const missing = [...layout.keys()].find((k) => !out.has(k));
    if (missing !== undefined) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud handed over ${out.size} of the middle adapter's ${layout.size} tensors; ${missing} is missing`, { field: 'stepCommitted.frames' });
    return out;
  }

  dispose(): void {
    this.kept.clear();
    this.feedback?.clear();
  }
}
