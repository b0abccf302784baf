// Training checkpoints for exact resume: the adapter (written by the caller, as a PEFT
// folder), optimizer state, random generators, data position, step and schedule. A
// checkpoint is written into a temporary sibling folder and renamed into place, so a
// crash leaves the previous checkpoint or the new one, never a mixture.
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ModelError } from '../errors.ts';
import { readModelFile, readSafetensorsFile, toFloat32, writeSafetensorsFile } from '../safetensors.ts';
import type { BatchStreamState } from './data.ts';
import type { OptimizerKind, OptimizerState, StateTensor } from './optimizer.ts';

export const CHECKPOINT_VERSION = 1;
export const TRAINER_STATE_FILE = 'trainer_state.json';
export const OPTIMIZER_FILE = 'optimizer.safetensors';
export const CHECKPOINT_ADAPTER_DIR = 'adapter';

/** The JSON half of a checkpoint. */
export interface TrainerState {
  version: number;
  /** Optimizer steps completed. */
  step: number;
  optimizer: { kind: OptimizerKind; step: number };
  /** The data stream's position and generator. */
  data: BatchStreamState;
  /** The adapter's generators (dropout), when it has any. */
  adapterRandom?: number[][];
  /** What the run must agree with to resume (model hash, data file, recipe); compared key by key. */
  run: Record<string, unknown>;
  /** Progress the caller wants back (best validation loss, tokens seen...). */
  extra?: Record<string, unknown>;
}

export interface TrainingCheckpoint {
  state: TrainerState;
  optimizer: OptimizerState;
  /** The adapter folder inside the checkpoint. */
  adapterDir: string;
}

function invalid(message: string, file: string, cause?: unknown): ModelError {
  return new ModelError('TANDEM_CHECKPOINT_INVALID', message, { file, cause });
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Writes a checkpoint to `dir`, replacing the one there atomically. `writeAdapter` writes the
 * adapter folder into the directory it is given.
 */
export async function saveTrainingCheckpoint(
  dir: string,
  checkpoint: { state: Omit<TrainerState, 'version'>; optimizer: OptimizerState },
  writeAdapter: (adapterDir: string) => Promise<void>,
): Promise<void> {
  const parent = dirname(dir);
  await mkdir(parent, { recursive: true });
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmp = join(parent, `.${basename(dir)}.tmp-${tag}`);
  const old = join(parent, `.${basename(dir)}.old-${tag}`);
  try {
    await mkdir(tmp);
    await writeAdapter(join(tmp, CHECKPOINT_ADAPTER_DIR));
    const tensors = new Map([...checkpoint.optimizer.tensors].map(([k, t]) => [k, { dtype: 'F32' as const, shape: t.shape, data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) }]));
    await writeSafetensorsFile(join(tmp, OPTIMIZER_FILE), tensors, { format: 'pt' });
    const state: TrainerState = { version: CHECKPOINT_VERSION, ...checkpoint.state };
    await writeFile(join(tmp, TRAINER_STATE_FILE), `${JSON.stringify(state, null, 2)}\n`);
    const hadOld = await exists(dir);
    if (hadOld) await rename(dir, old);
    await rename(tmp, dir);
    if (hadOld) await rm(old, { recursive: true, force: true });
  } catch (cause) {
    await rm(tmp, { recursive: true, force: true });
    if (cause instanceof ModelError) throw cause;
    throw new ModelError('TANDEM_MODEL_FILE_UNWRITABLE', `the checkpoint could not be written (${(cause as NodeJS.ErrnoException).code ?? String(cause)})`, { file: dir, cause });
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isWords(v: unknown): v is number[] {
  return Array.isArray(v) && v.length === 4 && v.every((w) => Number.isInteger(w) && w >= 0 && w < 2 ** 32);
}

/** The largest trainer_state.json read (the run's recipe and the generators' states: a few KiB). */
const MAX_TRAINER_STATE_BYTES = 16 * 1024 * 1024;

/** Reads a checkpoint written by saveTrainingCheckpoint; anything missing or malformed is TANDEM_CHECKPOINT_INVALID naming the file. */
export async function readTrainingCheckpoint(dir: string): Promise<TrainingCheckpoint> {
  const statePath = join(dir, TRAINER_STATE_FILE);
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(await readModelFile(statePath, MAX_TRAINER_STATE_BYTES)).toString('utf8'));
  } catch (cause) {
    if (cause instanceof ModelError && cause.code === 'TANDEM_MODEL_FILE_MISSING') throw invalid('there is no checkpoint here', statePath, cause);
    throw invalid(`the file is not readable JSON (${cause instanceof ModelError ? cause.message : (cause as Error).message})`, statePath, cause);
  }
  if (!isObject(raw)) throw invalid('expected a JSON object', statePath);
  if (raw.version !== CHECKPOINT_VERSION) throw invalid(`version ${JSON.stringify(raw.version)} is not ${CHECKPOINT_VERSION}`, statePath);
  const step = raw.step;
  const opt = raw.optimizer;
  const data = raw.data;
  if (!Number.isInteger(step) || (step as number) < 0) throw invalid('"step" must be a non-negative integer', statePath);
  if (!isObject(opt) || (opt.kind !== 'adamw' && opt.kind !== 'sgd') || !Number.isInteger(opt.step)) throw invalid('"optimizer" must name the kind and the step', statePath);
  if (!isObject(data) || !Number.isInteger(data.epoch) || (data.epoch as number) < 0 || !Number.isInteger(data.position) || (data.position as number) < 0 || !isWords(data.epochRng)) {
    throw invalid('"data" must hold epoch and position (non-negative integers) and epochRng', statePath);
  }
  if (raw.adapterRandom !== undefined && !(Array.isArray(raw.adapterRandom) && raw.adapterRandom.every(isWords))) throw invalid('"adapterRandom" must be a list of generator states', statePath);
  if (!isObject(raw.run)) throw invalid('"run" must be an object', statePath);
  const optimizerPath = join(dir, OPTIMIZER_FILE);
  const contents = await readSafetensorsFile(optimizerPath).catch((cause: unknown) => {
    throw invalid(`optimizer state unreadable: ${(cause as Error).message}`, optimizerPath, cause);
  });
  const tensors = new Map<string, StateTensor>();
  for (const [name, entry] of contents.tensors) tensors.set(name, { shape: [...entry.shape], data: Float32Array.from(toFloat32(entry, optimizerPath, name)) });
  const adapterDir = join(dir, CHECKPOINT_ADAPTER_DIR);
  if (!(await exists(adapterDir))) throw invalid('the checkpoint has no adapter folder', adapterDir);
  return {
    state: raw as unknown as TrainerState,
    optimizer: { kind: opt.kind, step: opt.step as number, tensors },
    adapterDir,
  };
}

/** Checks that a checkpoint belongs to this run: every recorded setting must match. */
export function checkSameRun(saved: Record<string, unknown>, current: Record<string, unknown>, file: string): void {
  for (const key of new Set([...Object.keys(saved), ...Object.keys(current)])) {
    const a = JSON.stringify(saved[key]);
    const b = JSON.stringify(current[key]);
    if (a !== b) throw new ModelError('TANDEM_CHECKPOINT_INVALID', `the checkpoint was written with ${key} = ${a ?? 'nothing'}, this run has ${b ?? 'nothing'}`, { file, field: key });
  }
}
