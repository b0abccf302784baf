// An emulator build in a worker thread of its own (emulator-build-worker.ts), off the node's
// event loop. Its typed errors come back as the same classes (EmulatorError, ModelError) with
// the same codes, so the registry maps them as it did; `stop` ends a build the node no longer
// waits for (the node closing).
import type { Worker } from 'node:worker_threads';
import { EMULATOR_ERRORS, EmulatorError } from '../emulator/index.ts';
import type { BuildEmulatorOptions, EmulatorErrorCode } from '../emulator/index.ts';
import { MODEL_ERRORS, ModelError, startTsWorker } from '../model/index.ts';
import type { ModelErrorCode } from '../model/index.ts';
import type { CrossedError, EmulatorBuildReply, EmulatorBuildStart } from './emulator-build-worker.ts';

/** The message as its class's constructor was given it: without the " (file …, field …)" it appended. */
function bareMessage(e: CrossedError): string {
  const where = [e.file && `file ${e.file}`, e.tensor && `tensor ${e.tensor}`, e.field && `field ${e.field}`].filter(Boolean).join(', ');
  const suffix = where ? ` (${where})` : '';
  return suffix && e.message.endsWith(suffix) ? e.message.slice(0, -suffix.length) : e.message;
}

/** The error the build threw, rebuilt on this side. */
export function rebuiltError(e: CrossedError): Error {
  if (e.name === 'EmulatorError' && e.code !== undefined && Object.hasOwn(EMULATOR_ERRORS, e.code)) {
    return new EmulatorError(e.code as EmulatorErrorCode, bareMessage(e), { file: e.file, field: e.field, details: e.details });
  }
  if (e.name === 'ModelError' && e.code !== undefined && Object.hasOwn(MODEL_ERRORS, e.code)) {
    return new ModelError(e.code as ModelErrorCode, bareMessage(e), { file: e.file, field: e.field, tensor: e.tensor, details: e.details });
  }
  const error = new Error(e.message);
  error.name = e.name;
  return error;
}

export interface EmulatorBuildThread {
  /** Resolves when the bundle is written to `options.outDir`; rejects with the build's error. */
  readonly done: Promise<void>;
  /** Ends the build (its thread is terminated; `done` rejects). */
  stop(): Promise<void>;
}

/** Starts one build on a thread of its own, on the first of `backends` that loads there. */
export function startEmulatorBuild(options: EmulatorBuildStart['options'] & Pick<BuildEmulatorOptions, 'outDir'>, backends: readonly string[]): EmulatorBuildThread {
  const start: EmulatorBuildStart = { options, backends: [...backends] };
  const worker: Worker = startTsWorker(new URL('./emulator-build-worker.ts', import.meta.url), start);
  // The thread is ended as soon as it answers: nothing it still holds (a backend, an engine) keeps it.
  const done = new Promise<void>((resolve, reject) => {
    let answered = false;
    worker.on('message', (m: EmulatorBuildReply) => {
      answered = true;
      if (m.op === 'built') resolve();
      else reject(rebuiltError(m.error));
      worker.terminate().catch(() => undefined);
    });
    worker.once('error', (error) => reject(error));
    worker.once('exit', (code) => {
      if (!answered) reject(new Error(`the emulator build's thread ended (exit code ${code}) before the bundle was built`));
    });
  });
  done.catch(() => undefined);
  return { done, stop: async () => { await worker.terminate(); } };
}
