// Timed LoRA training steps for the benches: random token batches, LoRA r8 on the edge's
// blocks, and the median step after a warm-up one (local, or split through a Middle); and an
// edge of a cut opened against a node, on ONNX Runtime where the engine choice has it.
import { join } from 'node:path';
import { connectCloud, loadEdgePart } from '../edge-client/index.ts';
import type { CloudClient, LoadedEdgePart } from '../edge-client/index.ts';
import { OrtLlama, Rng, Trainer, createAdapter, createOptimizer, weightArraysOf } from '../model/index.ts';
import type { Batch, Cut, EngineChoice, LlamaModel, MethodSpec, Middle, WeightArrays } from '../model/index.ts';

/** The model on ONNX Runtime when the choice is an ORT engine (undefined: tfjs computes it). */
export async function openOrt(choice: EngineChoice, config: LlamaModel['config'], weights: WeightArrays): Promise<OrtLlama | undefined> {
  return choice.ortProvider ? OrtLlama.create(config, weights, { threads: choice.threads, provider: choice.ortProvider }) : undefined;
}

export interface BenchEdge {
  client: CloudClient;
  /** The node's model id. */
  id: string;
  edge: LoadedEdgePart;
  engine: OrtLlama | undefined;
  close(): Promise<void>;
}

/** The edge part of `cut` from the node at `url` (downloaded under `work`), connected with `key`. */
export async function openEdge(url: string, key: string, cut: Cut, work: string, choice: EngineChoice): Promise<BenchEdge> {
  const client = await connectCloud(url, { key });
  try {
    const id = (await client.models())[0].id;
    const edge = await loadEdgePart(await client.downloadEdge(id, cut, join(work, 'cache')));
    const engine = await openOrt(choice, edge.model.config, weightArraysOf(edge.model));
    return {
      client, id, edge, engine,
      async close() {
        await engine?.dispose();
        edge.model.dispose();
        client.close();
      },
    };
  } catch (error) {
    client.close();
    throw error;
  }
}

/** `n` batches of `rows` x `seq` random tokens, each its own labels. */
export function batches(vocab: number, rows: number, seq: number, n: number, seed: number): Batch[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => {
    const ids = Array.from({ length: rows }, () => Array.from({ length: seq }, () => rng.int(vocab)));
    return { ids, labels: ids.map((r) => [...r]) };
  });
}

/** LoRA r8 on q_proj and v_proj of the blocks the edge keeps under `cut`. */
export function methodsFor(layers: number, cut: Cut): MethodSpec[] {
  const edgeLayers = [...Array(layers).keys()].filter((l) => l < cut.bottom || l >= layers - cut.top);
  return [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'], layersToTransform: edgeLayers }];
}

export interface TimedSteps {
  /** Median seconds of the steps after the first. */
  median: number;
  /** Seconds of the steps after the first, all together. */
  total: number;
  /** Seconds of each step after the first, in order. */
  times: number[];
}

/** The median of `values` (the upper one of an even count). */
export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/** One step per batch; the first is a warm-up, and `afterWarmUp` runs once it is done. */
export async function timeSteps(model: LlamaModel, cut: Cut | undefined, middle: Middle | undefined, methods: MethodSpec[], data: Batch[], engine: OrtLlama | undefined, afterWarmUp?: () => void): Promise<TimedSteps> {
  const adapter = createAdapter(model, methods, { seed: 1 });
  const optimizer = createOptimizer('adamw');
  const trainer = new Trainer({ model, adapter, optimizer, schedule: { kind: 'constant', lr: 1e-3, warmupSteps: 0, totalSteps: data.length }, cut, middle, engine });
  try {
    const times: number[] = [];
    for (const [i, b] of data.entries()) {
      const t0 = performance.now();
      await trainer.trainStep([b]);
      if (i > 0) times.push((performance.now() - t0) / 1000);
      else afterWarmUp?.();
    }
    return { median: median(times), total: times.reduce((a, t) => a + t, 0), times };
  } finally {
    trainer.dispose();
    optimizer.dispose();
    adapter.dispose();
  }
}

/** Seconds the node's middle spent on Forwards and Backwards so far (its tandem_step_seconds), read from /metrics with the admin key. */
export async function nodeMiddleSeconds(url: string, adminKey: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${adminKey}` } })).text();
  let seconds = 0;
  for (const line of text.split('\n')) if (line.startsWith('tandem_step_seconds_sum{')) seconds += Number(line.slice(line.lastIndexOf(' ') + 1));
  return seconds;
}
