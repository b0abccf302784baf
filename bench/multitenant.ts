// Many sessions on one backbone (issue 13): `npm run bench -- multitenant [--quick] [--steps N] [--engine ort-cpu|ort-cuda]`.
//
// 1. The cloud's middle executor (one compute worker) serving 1, 4, 8 and 16 concurrent
//    sessions, each a loop of 64-token micro-batches (Forward keeping its tape, then its
//    Backward from the tape), on a random Llama of ~25M parameters, cut (2, 2): batched
//    (requests coalesced within a window, packed along tokens) against unbatched (one request
//    per backbone call). Aggregate tokens/s, p50/p99 of one session's step.
// 2. 8 sessions in one packed training step of the middle (forward and backward, gradients
//    of h_B and of the LoRA factors) with each its own LoRA (r 8 on q_proj, v_proj of every
//    middle block; Punica's grouping: the base matmul once for all tokens, the low-rank
//    parts per session) against the same 8 sessions with none, in this thread.
// 3. The real path of cloud-held middle adapters (protocol 1.3): 8 concurrent sessions through
//    the executor, each holding its own LoRA (cloud-node/held-adapters.ts: created from its seed,
//    forwards batched with segment-lora, the backward recomputing from h_B and returning the
//    factors' gradients, then the AdamW commit), against 8 sessions with none on the same
//    recompute path (Forward without a tape, Backward from h_B).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HeldAdapter } from '../cloud-node/held-adapters.ts';
import { MiddleExecutor, TapeLost } from '../cloud-node/middle-executor.ts';
import { LlamaModel, PackedBlocks, Rng, gradients, initBackend, loadModelFolder, segmentLoraDelta, tf } from '../model/index.ts';
import type { LoraFactors, SegmentLora } from '../model/index.ts';
import { randomModelDir } from './_random-model.ts';

const SEQ = 64;
const CUT = { bottom: 2, top: 2 };

interface Row {
  sessions: number;
  batched: boolean;
  middleLora: boolean;
  tokensPerSecond: number;
  p50StepSeconds: number;
  p99StepSeconds: number;
  /**
   * executor: through the cloud's executor (a worker thread), tapes kept; packed: one packed
   * middle training step in this thread; held: the executor's recompute path, with a held
   * middle LoRA per session (middleLora true) or none (false).
   */
  measured: 'executor' | 'packed' | 'held';
  /** Backwards whose packed tape had served the members there before them: recomputed from h_B. */
  recomputedBackwards?: number;
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function random(n: number, rng: Rng, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.normal() * scale;
  return out;
}

/** One warm-up step per session, then `steps` each, all sessions at once: aggregate tokens/s and step latency quantiles. */
async function concurrentSteps(sessions: number, steps: number, step: (i: number) => Promise<number>): Promise<{ tokensPerSecond: number; p50: number; p99: number }> {
  const all = [...Array(sessions).keys()];
  await Promise.all(all.map((i) => step(i)));
  const latencies: number[] = [];
  const t0 = performance.now();
  await Promise.all(all.map(async (i) => {
    for (let s = 0; s < steps; s++) latencies.push(await step(i));
  }));
  const wall = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  return { tokensPerSecond: (sessions * steps * SEQ) / wall, p50: quantile(latencies, 0.5), p99: quantile(latencies, 0.99) };
}

async function sessionsOn(executor: MiddleExecutor, sessions: number, steps: number, hidden: number, layers: number): Promise<{ tokensPerSecond: number; p50: number; p99: number; recomputed: number }> {
  const range = { start: CUT.bottom, end: layers - CUT.top };
  const shape: [number, number, number] = [1, SEQ, hidden];
  const rng = new Rng(sessions);
  const inputs = Array.from({ length: sessions }, () => ({ h: random(SEQ * hidden, rng), g: random(SEQ * hidden, rng, 1e-3) }));
  let recomputed = 0;
  const step = async (i: number): Promise<number> => {
    const t0 = performance.now();
    const { tape } = await executor.forwardKeepingTape(range, inputs[i].h, shape, `tenant${i}`);
    try {
      await executor.backwardFromTape(tape, inputs[i].g, shape, `tenant${i}`);
    } catch (error) {
      // As the session service does: a packed tape whose backward already ran for the members
      // that were there is gone for a late one, which recomputes from h_B.
      if (!(error instanceof TapeLost)) throw error;
      recomputed++;
      await executor.backward(range, inputs[i].h, inputs[i].g, shape, `tenant${i}`);
    }
    return (performance.now() - t0) / 1000;
  };
  return { ...(await concurrentSteps(sessions, steps, step)), recomputed };
}

/** Seconds of packed training steps of the middle for `sessions` segments, each with its LoRA or none. */
async function packedLoraSteps(model: LlamaModel, sessions: number, steps: number, withLora: boolean): Promise<number[]> {
  const { hiddenSize: hidden, numHiddenLayers: layers, headDim, numAttentionHeads, numKeyValueHeads } = model.config;
  const packed = new PackedBlocks(model);
  const rng = new Rng(5);
  const r = 8;
  const outOf = { q_proj: numAttentionHeads * headDim, v_proj: numKeyValueHeads * headDim };
  const loras: SegmentLora[] = [];
  const factors: tf.Variable[] = [];
  if (withLora) {
    for (let s = 0; s < sessions; s++) {
      const lora = new Map<string, LoraFactors>();
      for (let layer = CUT.bottom; layer < layers - CUT.top; layer++) {
        for (const [name, out] of Object.entries(outOf)) {
          const a = tf.variable(tf.tensor2d(random(r * hidden, rng, 0.02), [r, hidden]));
          const b = tf.variable(tf.tensor2d(random(out * r, rng, 0.02), [out, r]));
          factors.push(a, b);
          lora.set(`model.layers.${layer}.self_attn.${name}`, { a, b, scale: 16 / r });
        }
      }
      loras.push(lora);
    }
  }
  const segments = Array.from({ length: sessions }, () => ({ start: CUT.bottom, end: layers - CUT.top, batch: 1, seq: SEQ }));
  const delta = withLora ? segmentLoraDelta(loras) : undefined;
  const times: number[] = [];
  try {
    for (let s = 0; s <= steps; s++) {
      const t0 = performance.now();
      const grads = tf.tidy(() => {
        const inputs = segments.map(() => tf.tensor2d(random(SEQ * hidden, rng), [SEQ, hidden]));
        const dy = tf.tensor2d(random(sessions * SEQ * hidden, rng, 1e-3), [sessions * SEQ, hidden]);
        const { grads } = gradients(() => tf.concat(packed.run(inputs, segments, delta), 0), [...inputs, ...factors], dy);
        return grads.filter((g): g is tf.Tensor => g !== undefined);
      });
      await Promise.all(grads.map((g) => g.data()));
      tf.dispose(grads);
      if (s > 0) times.push((performance.now() - t0) / 1000);
    }
  } finally {
    tf.dispose(factors);
    packed.dispose();
  }
  return times.sort((a, b) => a - b);
}

/** `sessions` concurrent loops through the executor's recompute path, each with its own held LoRA or none. */
async function heldSessionsOn(executor: MiddleExecutor, model: LlamaModel, sessions: number, steps: number, withLora: boolean): Promise<{ tokensPerSecond: number; p50: number; p99: number }> {
  const { hiddenSize: hidden, numHiddenLayers: layers } = model.config;
  const range = { start: CUT.bottom, end: layers - CUT.top };
  const middle = Array.from({ length: range.end - range.start }, (_, i) => range.start + i);
  const shape: [number, number, number] = [1, SEQ, hidden];
  const rng = new Rng(100 + sessions);
  const spec = { method: 'lora' as const, rank: 8, alpha: 16, targets: ['q_proj', 'v_proj'], methodIndex: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 };
  const inputs = Array.from({ length: sessions }, (_, i) => ({
    h: random(SEQ * hidden, rng), g: random(SEQ * hidden, rng, 1e-3),
    held: withLora ? HeldAdapter.create(model, `bench-${i}`, `tenant${i}`, { ...spec, seed: i }, middle) : undefined,
  }));
  const stepOf = new Array<number>(sessions).fill(0);
  const step = async (i: number): Promise<number> => {
    const t0 = performance.now();
    const { h, g, held } = inputs[i];
    const tenant = `tenant${i}`;
    if (held === undefined) {
      await executor.forward(range, h, shape, tenant);
      await executor.backward(range, h, g, shape, tenant);
    } else {
      await executor.forwardHeld(range, h, shape, tenant, held.lora());
      const { loraGrads } = await executor.backwardHeld(range, h, g, shape, tenant, held.lora());
      const s = ++stepOf[i];
      held.accumulate(s, 0, loraGrads);
      held.commit({ sessionId: held.sessionId, step: s, lr: 1e-4, maxGradNorm: 1, edgeGradSquareSum: 0, microbatches: 1, exportAdapter: false });
    }
    return (performance.now() - t0) / 1000;
  };
  return concurrentSteps(sessions, steps, step);
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const stepsAt = args.indexOf('--steps');
  const steps = stepsAt >= 0 ? Number(args[stepsAt + 1]) : quick ? 2 : 5;
  const counts = quick ? [1, 4, 8] : [1, 4, 8, 16];
  const windowMs = 5;
  const engineAt = args.indexOf('--engine');
  const engineName = engineAt >= 0 ? args[engineAt + 1] : undefined;
  if (engineName !== undefined && engineName !== 'ort-cpu' && engineName !== 'ort-cuda') throw new Error(`--engine is ort-cpu or ort-cuda (the executor's ORT engines); got ${engineName}`);
  const engine = engineName as 'ort-cpu' | 'ort-cuda' | undefined;
  const backend = await initBackend();
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-multitenant-'));
  const rows: Row[] = [];
  try {
    const dir = await randomModelDir(work);
    const loaded = await loadModelFolder(dir);
    const { hiddenSize: hidden, numHiddenLayers: layers } = loaded.config;
    for (const batched of [false, true]) {
      const executor = await MiddleExecutor.start({
        modelDir: dir, engine, batchWindowMs: batched ? windowMs : 0, maxBatchTokens: batched ? Math.max(...counts) * SEQ : 1,
      });
      try {
        // ORT's first runs of a graph are slower than the rest (one warm-up step per session is not
        // enough: 1 unbatched session read 53 ms a step measured first and 30 ms measured again).
        await sessionsOn(executor, 1, 5, hidden, layers);
        for (const sessions of counts) {
          const r = await sessionsOn(executor, sessions, steps, hidden, layers);
          rows.push({ sessions, batched, middleLora: false, tokensPerSecond: r.tokensPerSecond, p50StepSeconds: r.p50, p99StepSeconds: r.p99, measured: 'executor', recomputedBackwards: r.recomputed });
          process.stdout.write(`${sessions} sessions ${batched ? 'batched' : 'unbatched'}: ${r.tokensPerSecond.toFixed(0)} tokens/s, p50 ${r.p50.toFixed(3)} s, p99 ${r.p99.toFixed(3)} s, ${r.recomputed} backwards recomputed (tape gone)\n`);
        }
      } finally {
        await executor.close();
      }
    }
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    try {
      for (const middleLora of [false, true]) {
        const times = await packedLoraSteps(model, 8, steps, middleLora);
        const p50 = quantile(times, 0.5);
        rows.push({ sessions: 8, batched: true, middleLora, tokensPerSecond: (8 * SEQ) / p50, p50StepSeconds: p50, p99StepSeconds: quantile(times, 0.99), measured: 'packed' });
        process.stdout.write(`8 sessions packed in-thread, ${middleLora ? 'each its own middle LoRA' : 'no middle LoRA'}: p50 ${p50.toFixed(3)} s a training step of the middle\n`);
      }
      // Held adapters on the executor's engine (tfjs, or ORT's stacked segment graphs).
      const executor = await MiddleExecutor.start({ modelDir: dir, engine, batchWindowMs: windowMs, maxBatchTokens: 8 * SEQ });
      try {
        for (const middleLora of [false, true]) await heldSessionsOn(executor, model, 8, 2, middleLora); // warm-up, as above
        for (const middleLora of [false, true]) {
          const r = await heldSessionsOn(executor, model, 8, steps, middleLora);
          rows.push({ sessions: 8, batched: true, middleLora, tokensPerSecond: r.tokensPerSecond, p50StepSeconds: r.p50, p99StepSeconds: r.p99, measured: 'held' });
          process.stdout.write(`8 sessions through the executor's recompute path, ${middleLora ? 'each its own held middle LoRA (forward, backward, AdamW commit)' : 'no middle LoRA'}: ${r.tokensPerSecond.toFixed(0)} tokens/s, p50 ${r.p50.toFixed(3)} s, p99 ${r.p99.toFixed(3)} s\n`);
        }
      } finally {
        await executor.close();
      }
    } finally {
      model.dispose();
    }
    const at = (measured: Row['measured'], sessions: number, batched: boolean, middleLora = false): Row => {
      const row = rows.find((r) => r.measured === measured && r.sessions === sessions && r.batched === batched && r.middleLora === middleLora);
      if (row === undefined) throw new Error(`no row for ${sessions} sessions`);
      return row;
    };
    const targets = {
      batchedOverUnbatchedAt8: at('executor', 8, true).tokensPerSecond / at('executor', 8, false).tokensPerSecond,
      loraOverNoneAt8: at('packed', 8, true, true).p50StepSeconds / at('packed', 8, true).p50StepSeconds,
      batchedP99At8OverOneSession: at('executor', 8, true).p99StepSeconds / at('executor', 1, true).p99StepSeconds,
      heldLoraOverNoneAt8: at('held', 8, true, true).p50StepSeconds / at('held', 8, true).p50StepSeconds,
    };
    process.stdout.write(`executor ${engine ?? `tfjs ${backend.name}`}, in-thread ${backend.name}; targets: 8 batched / 8 unbatched ${targets.batchedOverUnbatchedAt8.toFixed(2)}x (>= 3), `
      + `8 LoRAs / none ${targets.loraOverNoneAt8.toFixed(2)}x (<= 1.2), batched p99 at 8 / 1 session ${targets.batchedP99At8OverOneSession.toFixed(2)}x (<= 2)`
      + `, 8 held LoRAs / none through the executor ${targets.heldLoraOverNoneAt8.toFixed(2)}x (<= 1.2)\n`);
    return { backend: backend.name, executorEngine: engine ?? `tfjs ${backend.name}`, steps, seq: SEQ, cut: CUT, windowMs, parameters: [...loaded.weights.values()].reduce((n, w) => n + w.data.length, 0), rows, targets };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
