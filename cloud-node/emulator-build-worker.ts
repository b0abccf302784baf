// The worker thread of one emulator build (node:worker_threads): the layer drop, the
// distillation of the kept blocks and the fidelity report are minutes of compute for a real
// model (measured on the 25M bench model with 10 distillation steps: the node's event loop
// stood still for 69 s when the build ran on it). Here heartbeats, REST and the other
// tenants' sessions go on while it runs. One build per thread; the thread ends with it.
import { parentPort, workerData } from 'node:worker_threads';
import { isTandemError } from '../common/define-errors.ts';
import { buildEmulator } from '../emulator/index.ts';
import type { BuildEmulatorOptions } from '../emulator/index.ts';
import { initFirstBackend } from '../model/index.ts';

/** The build's options, less its callbacks, and the tfjs backends to try in turn. */
export interface EmulatorBuildStart {
  options: Omit<BuildEmulatorOptions, 'log' | 'onEvent' | 'backend'>;
  backends: string[];
}

/** A typed error as it crosses the thread: what rebuilds it on the other side. */
export interface CrossedError {
  name: string;
  code?: string;
  message: string;
  details?: Record<string, unknown>;
  file?: string;
  field?: string;
  tensor?: string;
}

export type EmulatorBuildReply = { op: 'built' } | { op: 'failed'; error: CrossedError };

const port = parentPort;
if (port === null) throw new Error('emulator-build-worker.ts runs as a worker thread');
const start = workerData as EmulatorBuildStart;

function crossed(error: unknown): CrossedError {
  if (!isTandemError(error)) return { name: error instanceof Error ? error.name : 'Error', message: error instanceof Error ? error.message : String(error) };
  const e = error as typeof error & { file?: string; field?: string; tensor?: string };
  return { name: e.name, code: e.code, message: e.message, details: { ...e.details }, file: e.file, field: e.field, tensor: e.tensor };
}

try {
  const backend = await initFirstBackend(start.backends);
  await buildEmulator({ ...start.options, backend });
  port.postMessage({ op: 'built' } satisfies EmulatorBuildReply);
} catch (error) {
  port.postMessage({ op: 'failed', error: crossed(error) } satisfies EmulatorBuildReply);
}
