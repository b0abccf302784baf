// Backend selection: which compute backend runs, picked once per process, best first.
// Importing this file changes nothing; initBackend (or useBackend) does the work.
import { ModelError } from '../errors.ts';
import { tf } from './tf.ts';
import { registerWasmFallbacks } from './wasm-kernels.ts';

/** Backends best first; names are tfjs's own backend names except for the GPU build of tfjs-node. */
export const BACKENDS = ['tensorflow-gpu', 'tensorflow', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

const ALIASES: Record<string, BackendName> = {
  'tensorflow-gpu': 'tensorflow-gpu',
  'node-gpu': 'tensorflow-gpu',
  gpu: 'tensorflow-gpu',
  tensorflow: 'tensorflow',
  node: 'tensorflow',
  wasm: 'wasm',
  cpu: 'cpu',
};

export interface BackendChoice {
  name: BackendName;
  /** Backends tried before this one, with why each was passed over. */
  skipped: { name: BackendName; reason: string }[];
}

let active: BackendChoice | undefined;

/** Parses a backend name from a flag or TANDEM_BACKEND; 'auto' or undefined means best available. */
export function parseBackendName(value: string | undefined, field = '--backend'): BackendName | undefined {
  if (value === undefined || value === '' || value === 'auto') return undefined;
  const name = ALIASES[value];
  if (!name) {
    throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `unknown backend ${JSON.stringify(value)}; choose one of auto, ${BACKENDS.join(', ')}`, { field });
  }
  return name;
}

async function tryBackend(name: BackendName): Promise<void> {
  // PROD silences tfjs's console banners and skips its debug-only checks.
  tf.env().set('PROD', true);
  switch (name) {
    case 'tensorflow-gpu':
      // Both native packages register a backend called 'tensorflow' when imported.
      await import('@tensorflow/tfjs-node-gpu' as string);
      break;
    case 'tensorflow':
      await import('@tensorflow/tfjs-node' as string);
      break;
    case 'wasm':
      await import('@tensorflow/tfjs-backend-wasm');
      registerWasmFallbacks();
      break;
    case 'cpu':
      break;
  }
  const tfName = name === 'tensorflow-gpu' ? 'tensorflow' : name;
  if (!(await tf.setBackend(tfName))) throw new Error(`tf.setBackend('${tfName}') failed`);
  await tf.ready();
}

/**
 * Starting a backend is one at a time in a process: tfjs's setBackend fails for a second
 * caller while the first one's wasm module is still loading (two nodes started together).
 */
let starting: Promise<unknown> = Promise.resolve();
function oneAtATime<T>(start: () => Promise<T>): Promise<T> {
  const run = starting.then(start);
  starting = run.catch(() => undefined);
  return run;
}

/**
 * Picks the compute backend: the one asked for (flag, then TANDEM_BACKEND), or the best that
 * loads, once per process. Asking for one that does not load is a typed error.
 */
export function initBackend(options: { backend?: string; log?: (line: string) => void } = {}): Promise<BackendChoice> {
  return oneAtATime(() => pickBackend(options));
}

async function pickBackend(options: { backend?: string; log?: (line: string) => void }): Promise<BackendChoice> {
  const wanted = parseBackendName(options.backend ?? process.env.TANDEM_BACKEND, options.backend ? '--backend' : 'TANDEM_BACKEND');
  if (active && (wanted === undefined || wanted === active.name)) return active;
  const order = wanted ? [wanted] : [...BACKENDS];
  const skipped: BackendChoice['skipped'] = [];
  for (const name of order) {
    try {
      await tryBackend(name);
      active = { name, skipped };
      options.log?.(`backend: ${name}${skipped.length ? ` (skipped ${skipped.map((s) => s.name).join(', ')})` : ''}`);
      return active;
    } catch (err) {
      skipped.push({ name, reason: err instanceof Error ? err.message.split('\n')[0] : String(err) });
    }
  }
  throw new ModelError('TANDEM_BACKEND_UNAVAILABLE', `no backend could be started: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ')}`, {
    details: { skipped },
  });
}

/** The backend chosen by initBackend, or undefined before it ran. */
export function activeBackend(): BackendChoice | undefined {
  return active;
}

/**
 * Switches backends inside one process (tests compare backends). Production code calls
 * initBackend once at start instead.
 */
export function useBackend(name: BackendName): Promise<void> {
  return oneAtATime(async () => {
    await tryBackend(name);
    active = { name, skipped: [] };
  });
}

/**
 * The first of `names` that starts (a worker thread gets its parent's choice first, then the
 * fallbacks that load anywhere): its name, or the last failure when none does.
 */
export async function initFirstBackend(names: readonly string[]): Promise<string> {
  let lastError: unknown = new Error('no tfjs backend was named');
  for (const name of names) {
    try {
      return (await initBackend({ backend: name })).name;
    } catch (error) {
      lastError = error;
    }
  }
  throw lastError instanceof Error ? lastError : new Error(String(lastError));
}
