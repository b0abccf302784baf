// Timed LoRA training steps for the benches: random token batches, LoRA r8 on the edge's
// blocks, and the median step after a warm-up one (local, or split through a Middle).
import { Rng, Trainer, createAdapter, createOptimizer } from '../model/index.ts';
import type { Batch, Cut, LlamaModel, MethodSpec, Middle, OrtLlama } from '../model/index.ts';

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
    const total = times.reduce((a, t) => a + t, 0);
    times.sort((a, b) => a - b);
    return { median: times[Math.floor(times.length / 2)], total };
  } finally {
    trainer.dispose();
    optimizer.dispose();
    adapter.dispose();
  }
}
