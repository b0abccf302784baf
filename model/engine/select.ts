// The compute engine, picked once at start, best first: ONNX Runtime with CUDA, tfjs-node-gpu,
// ONNX Runtime on the CPU, tfjs-node, wasm, cpu. `--engine` or TANDEM_ENGINE override it and
// the choice is logged. ORT engines run the frozen backbone; tfjs (its best backend) stays
// for autodiff of the trainable parts, so an ORT choice also starts a tfjs backend.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import type { BackendName } from '../backend.ts';
import { initBackend } from '../backend.ts';
import { ModelError } from '../errors.ts';
import { GraphBuilder } from './graph.ts';
import { ONNX_FLOAT, encodeModel } from './onnx-proto.ts';
import type { OrtProvider } from './ort-llama.ts';
import { loadOrt } from './ort-llama.ts';

export const ENGINES = ['ort-cuda', 'tfjs-node-gpu', 'ort-cpu', 'tfjs-node', 'wasm', 'cpu'] as const;
export type EngineName = (typeof ENGINES)[number];

const ALIASES: Record<string, EngineName> = {
  'ort-cuda': 'ort-cuda',
  cuda: 'ort-cuda',
  'tfjs-node-gpu': 'tfjs-node-gpu',
  'tensorflow-gpu': 'tfjs-node-gpu',
  'ort-cpu': 'ort-cpu',
  ort: 'ort-cpu',
  onnxruntime: 'ort-cpu',
  'tfjs-node': 'tfjs-node',
  tensorflow: 'tfjs-node',
  wasm: 'wasm',
  cpu: 'cpu',
};

/** The tfjs backend behind each tfjs engine. */
const TFJS_BACKEND: Record<'tfjs-node-gpu' | 'tfjs-node' | 'wasm' | 'cpu', BackendName> = {
  'tfjs-node-gpu': 'tensorflow-gpu',
  'tfjs-node': 'tensorflow',
  wasm: 'wasm',
  cpu: 'cpu',
};

export interface EngineChoice {
  name: EngineName;
  /** Set for the ORT engines: the execution provider the backbone's sessions use. */
  ortProvider?: OrtProvider;
  /** The tfjs backend started alongside (the whole model for tfjs engines, the trainable parts for ORT). */
  tfjsBackend: BackendName;
  threads: number;
  /** Engines tried before this one, with why each was passed over. */
  skipped: { name: EngineName; reason: string }[];
}

/** Parses an engine name from a flag or TANDEM_ENGINE; 'auto' or undefined means best available. */
export function parseEngineName(value: string | undefined, field = '--engine'): EngineName | undefined {
  if (value === undefined || value === '' || value === 'auto') return undefined;
  const name = ALIASES[value];
  if (!name) throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `unknown engine ${JSON.stringify(value)}; choose one of auto, ${ENGINES.join(', ')}`, { field });
  return name;
}

function parseThreads(value: number | string | undefined, field: string): number {
  if (value === undefined || value === '') return availableParallelism();
  const n = typeof value === 'number' ? value : Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 1024) throw new ModelError('TANDEM_INPUT_INVALID', `threads must be an integer in [1, 1024], got ${JSON.stringify(value)}`, { field });
  return n;
}

/** Opens a one-node session on the provider: loading the library is not enough to know CUDA works. */
async function probeOrt(provider: OrtProvider): Promise<void> {
  const ort = await loadOrt();
  if (provider === 'cuda') {
    // The provider library comes from onnxruntime-node's postinstall, which .npmrc skips offline.
    const require = createRequire(import.meta.url);
    const dir = join(dirname(require.resolve('onnxruntime-node')), '..', 'bin', 'napi-v6', `${process.platform}`, process.arch);
    if (!existsSync(join(dir, 'libonnxruntime_providers_cuda.so'))) {
      throw new Error('the CUDA execution provider is not installed (ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node)');
    }
  }
  const g = new GraphBuilder('probe');
  const x = g.input('x', ONNX_FLOAT, [1]);
  g.alias(g.op('Relu', [x]), 'y');
  g.output('y', ONNX_FLOAT, [1]);
  const session = await ort.InferenceSession.create(encodeModel(g.build()), { executionProviders: [provider] });
  await session.release();
}

let active: EngineChoice | undefined;

/** The line that logs a choice, the same for the first pick and every later caller. */
function choiceLine(choice: EngineChoice): string {
  const tail = choice.skipped.length ? ` (skipped ${choice.skipped.map((s) => s.name).join(', ')})` : '';
  return `engine: ${choice.name}${choice.ortProvider ? ` (tfjs ${choice.tfjsBackend} for the trainable parts)` : ''}, ${choice.threads} threads${tail}`;
}

/**
 * Picks the engine: the one asked for (options.engine, then TANDEM_ENGINE), or the best that
 * starts, once per process. Asking for one that does not start is a typed error.
 */
export async function selectEngine(options: { engine?: string; threads?: number | string; log?: (line: string) => void } = {}): Promise<EngineChoice> {
  const wanted = parseEngineName(options.engine ?? process.env.TANDEM_ENGINE, options.engine ? '--engine' : 'TANDEM_ENGINE');
  const threads = parseThreads(options.threads ?? process.env.TANDEM_THREADS, options.threads !== undefined ? '--threads' : 'TANDEM_THREADS');
  if (active && (wanted === undefined || wanted === active.name) && active.threads === threads) {
    options.log?.(choiceLine(active));
    return active;
  }
  const order = wanted ? [wanted] : [...ENGINES];
  const skipped: EngineChoice['skipped'] = [];
  for (const name of order) {
    try {
      let choice: EngineChoice;
      if (name === 'ort-cuda' || name === 'ort-cpu') {
        const provider: OrtProvider = name === 'ort-cuda' ? 'cuda' : 'cpu';
        await probeOrt(provider);
        // The trainable parts: the best tfjs backend that is not a GPU one competing for the device.
        const tf = await initBackend(name === 'ort-cuda' ? {} : { backend: process.env.TANDEM_BACKEND });
        choice = { name, ortProvider: provider, tfjsBackend: tf.name, threads, skipped };
      } else {
        const tf = await initBackend({ backend: TFJS_BACKEND[name] });
        choice = { name, tfjsBackend: tf.name, threads, skipped };
      }
      active = choice;
      options.log?.(choiceLine(choice));
      return choice;
    } catch (err) {
      skipped.push({ name, reason: err instanceof Error ? err.message.split('\n')[0] : String(err) });
    }
  }
  throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `no engine could be started: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ')}`, {
    field: wanted ? (options.engine ? '--engine' : 'TANDEM_ENGINE') : 'engine',
    details: { skipped },
  });
}

/** The engine chosen by selectEngine, or undefined before it ran. */
export function activeEngine(): EngineChoice | undefined {
  return active;
}
