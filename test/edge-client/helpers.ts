// A real cloud node (cloud-node's factory) on loopback for the edge tests, and the local
// reference run the split runs are compared with.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCloudNode } from '../../cloud-node/index.ts';
import type { CloudNode } from '../../cloud-node/index.ts';
import { edgeRecipe } from '../../edge-client/index.ts';
import { trainLocal } from '../../model/index.ts';
import type { MethodSpec } from '../../model/index.ts';

export const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'stories260K');
export const MODEL_ID = 'stories260K';
export const DEMO_DATA = join(import.meta.dirname, '..', '..', 'cli', 'demo-data', 'feelings.jsonl');

export async function tempDir(prefix: string): Promise<{ dir: string; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), `tandem-${prefix}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export interface TestCloud {
  node: CloudNode;
  url: string;
  key: string;
  stateDir: string;
  /** Closes the node and starts a new one on the same port and state directory. */
  restart(): Promise<void>;
  close(): Promise<void>;
}

/** `engine`: the node's middle engine (TANDEM_ENGINE when unset). */
export async function startTestCloud(options: { memoryBudgetBytes?: number; engine?: string } = {}): Promise<TestCloud> {
  const state = await tempDir('cloud');
  const start = (port = 0) => startCloudNode({ modelDir: FIXTURE, stateDir: state.dir, port, logLevel: 'silent', memoryBudgetBytes: options.memoryBudgetBytes, engine: options.engine });
  let node = await start();
  const key = node.adminKey as string;
  const cloud: TestCloud = {
    node,
    url: node.url,
    key,
    stateDir: state.dir,
    async restart() {
      const port = node.port;
      await node.close();
      node = await start(port);
      cloud.node = node;
    },
    async close() {
      await node.close();
      await state.remove();
    },
  };
  return cloud;
}

export interface ReferenceOptions {
  methods: MethodSpec[];
  steps: number;
  batchSize: number;
  seqLen: number;
  lr: number;
  seed: number;
  gradientAccumulationSteps?: number;
}

/** The same training run on the whole model in this process (its own middle): same data, order, seed and recipe as trainEdge's. */
export async function trainReference(o: ReferenceOptions): Promise<{ losses: number[]; adapter: Map<string, Float32Array> }> {
  const out = await tempDir('reference');
  try {
    const recipe = edgeRecipe({ ...o });
    const result = await trainLocal({ ...recipe, modelDir: FIXTURE, dataFile: DEMO_DATA, outDir: out.dir, methods: o.methods, evaluate: false });
    return { losses: result.losses, adapter: new Map([...result.adapter].map(([k, v]) => [k, v.data])) };
  } finally {
    await out.remove();
  }
}

/** Largest absolute difference between two adapters' tensors; throws when their keys differ. */
export function maxAdapterDiff(a: Map<string, Float32Array>, b: Map<string, { data: Float32Array } | Float32Array>): number {
  const keysA = [...a.keys()].sort();
  const keysB = [...b.keys()].sort();
  if (JSON.stringify(keysA) !== JSON.stringify(keysB)) throw new Error(`adapter keys differ:\n${keysA.join(',')}\n${keysB.join(',')}`);
  let max = 0;
  for (const [k, x] of a) {
    const yv = b.get(k) as { data: Float32Array } | Float32Array;
    const y = yv instanceof Float32Array ? yv : yv.data;
    for (let i = 0; i < x.length; i++) max = Math.max(max, Math.abs(x[i] - y[i]));
  }
  return max;
}
