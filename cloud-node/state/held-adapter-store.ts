// The held middle adapters' checkpoints in the embedded state folder, under `held/`: per
// session a JSON file with the weights, AdamW's buffers and the last commit (tensors as base64
// float32, little-endian), written when the adapter is created and at each commit; and per
// backward of the step in progress one file of its gradients, `<session>.step-<s>.mb-<m>.f32`
// (raw float32, the tensors one after another), so that a backward writes only what it adds,
// not the whole adapter again. Every file is written atomically (json-file.ts), so a hard kill
// leaves the last acknowledged state whole; gradient files of a step already committed (a kill
// between the commit's checkpoint and their removal) are dropped when the folder is read.
import { readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { splitFloat32 } from '../../common/split-float32.ts';
import type { MiddleAdapterSpec } from '../../protocol/index.ts';
import { CloudError } from '../errors.ts';
import { ensureStateDir, readJsonState, syncDir, tidyStateDir, writeJsonState, writeStateFile } from './json-file.ts';

export const HELD_DIR = 'held';

export interface HeldParamSnapshot {
  key: string;
  shape: [number, number];
  value: Float32Array;
  expAvg: Float32Array;
  expAvgSq: Float32Array;
}

/** Everything a held adapter needs to continue exactly: weights, AdamW, the last commit, the step in progress. */
export interface HeldAdapterSnapshot {
  sessionId: string;
  tenant: string;
  spec: MiddleAdapterSpec;
  layers: number[];
  optimizerSteps: number;
  last?: { step: number; middleGradSquareSum: number };
  params: HeldParamSnapshot[];
  /** The backwards' gradients of the step not yet committed, by micro-batch. */
  pending?: { step: number; microbatches: [number, Float32Array[]][] };
}

const SESSION_ID = /^[0-9a-f-]{1,64}$/;
/** A gradient file's name: session, step, micro-batch. */
const GRADIENTS_FILE = /^([0-9a-f-]{1,64})\.step-(\d{1,15})\.mb-(\d{1,15})\.f32$/;

const b64 = (a: Float32Array): string => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');

function f32(text: unknown, file: string, length: number): Float32Array {
  if (typeof text !== 'string') throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'a tensor is not base64 text' });
  const bytes = Buffer.from(text, 'base64');
  if (bytes.length !== length * 4) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `a tensor has ${bytes.length} bytes, its shape needs ${length * 4}` });
  const out = new Float32Array(length);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

/** The bytes a held adapter takes: each tensor's float32 values and AdamW's two buffers of them. */
export function heldBytes(params: readonly { value: Float32Array }[]): number {
  return params.reduce((n, p) => n + p.value.length * 12, 0);
}

/** A snapshot as its checkpoint holds it: JSON, tensors as base64 float32. */
export function snapshotRecord(s: HeldAdapterSnapshot): Record<string, unknown> {
  return {
    sessionId: s.sessionId, tenant: s.tenant, spec: s.spec, layers: s.layers, optimizerSteps: s.optimizerSteps, last: s.last ?? null,
    params: s.params.map((p) => ({ key: p.key, shape: p.shape, value: b64(p.value), expAvg: b64(p.expAvg), expAvgSq: b64(p.expAvgSq) })),
    pending: s.pending === undefined ? null : { step: s.pending.step, microbatches: s.pending.microbatches.map(([mb, grads]) => [mb, grads.map(b64)]) },
  };
}

/** One backward's gradients as a gradient file holds them: the tensors' float32 values one after another. */
export function gradientBytes(grads: readonly Float32Array[]): Uint8Array {
  const bytes = new Uint8Array(grads.reduce((n, g) => n + g.byteLength, 0));
  let at = 0;
  for (const g of grads) {
    bytes.set(new Uint8Array(g.buffer, g.byteOffset, g.byteLength), at);
    at += g.byteLength;
  }
  return bytes;
}

/** Where held adapters are checkpointed: the state folder (this file) or a cluster's JetStream (jetstream-held-adapter-store.ts). */
export interface HeldCheckpoints {
  /** Every checkpoint to hold from the start (a cluster's gateways load theirs when first used: none). */
  loadAll(): Promise<HeldAdapterSnapshot[]>;
  /** The whole adapter (created, or a commit applied), the gradient files it holds applied dropped; durable once it resolves. */
  save(s: HeldAdapterSnapshot): Promise<void>;
  /** One backward's gradients of the step in progress (a retry of the micro-batch replaces them); durable once it resolves. */
  saveGradients(sessionId: string, step: number, microbatch: number, grads: readonly Float32Array[]): Promise<void>;
  remove(sessionId: string, tenant: string): Promise<void>;
  /**
   * Checkpoints other processes write too (a cluster's gateways): the session's checkpoint when
   * it changed since this store last read or wrote it, `gone` when there is none, `same` when it
   * did not change. Absent: this process is the only writer.
   */
  latest?(sessionId: string, tenant: string): Promise<HeldAdapterSnapshot | 'gone' | 'same'>;
  /** Forgets what this store last read or wrote of the session: the next `latest` reads it whole (shared stores only). */
  forget?(sessionId: string): void;
  /** The bytes of a tenant's held adapters in every process that shares these checkpoints (shared stores only). */
  bytesOf?(tenant: string): Promise<number>;
}

export class HeldAdapterStore implements HeldCheckpoints {
  readonly #dir: string;
  /** session → gradient file name → its step. */
  readonly #gradients = new Map<string, Map<string, number>>();

  private constructor(dir: string) {
    this.#dir = dir;
  }

  static async open(stateDir: string): Promise<HeldAdapterStore> {
    const dir = join(stateDir, HELD_DIR);
    await ensureStateDir(dir);
    await tidyStateDir(dir);
    return new HeldAdapterStore(dir);
  }

  #file(sessionId: string): string {
    if (!SESSION_ID.test(sessionId)) throw new CloudError('TANDEM_INTERNAL', { reason: 'a held adapter\'s session id is not a UUID' });
    return join(this.#dir, `${sessionId}.json`);
  }

  async save(s: HeldAdapterSnapshot): Promise<void> {
    await writeJsonState(this.#file(s.sessionId), snapshotRecord(s));
    // Steps count from 0: before the first commit no gradient file is applied.
    if (s.last !== undefined) await this.removeGradients(s.sessionId, s.last.step);
  }

  /** One backward's gradients of the step in progress (a retry of the micro-batch replaces them); durable once it resolves. */
  async saveGradients(sessionId: string, step: number, microbatch: number, grads: readonly Float32Array[]): Promise<void> {
    this.#file(sessionId);
    const bytes = gradientBytes(grads);
    const name = `${sessionId}.step-${step}.mb-${microbatch}.f32`;
    await writeStateFile(join(this.#dir, name), bytes);
    this.#track(sessionId, name, step);
  }

  #track(sessionId: string, name: string, step: number): void {
    let files = this.#gradients.get(sessionId);
    if (files === undefined) {
      files = new Map();
      this.#gradients.set(sessionId, files);
    }
    files.set(name, step);
  }

  /** Removes the session's gradient files of steps up to `step` (committed: the checkpoint holds them applied). */
  async removeGradients(sessionId: string, step = Number.MAX_SAFE_INTEGER): Promise<void> {
    if (await this.#removeGradientFiles(sessionId, step)) await syncDir(this.#dir);
  }

  /** The files this store wrote or found at load: no directory scan on a step's path. */
  async #removeGradientFiles(sessionId: string, step: number): Promise<boolean> {
    const files = this.#gradients.get(sessionId);
    let removed = false;
    for (const [name, s] of files ?? []) {
      if (s > step) continue;
      await rm(join(this.#dir, name), { force: true });
      files?.delete(name);
      removed = true;
    }
    if (files?.size === 0) this.#gradients.delete(sessionId);
    return removed;
  }

  async remove(sessionId: string): Promise<void> {
    await rm(this.#file(sessionId), { force: true });
    await this.#removeGradientFiles(sessionId, Number.MAX_SAFE_INTEGER);
    await syncDir(this.#dir);
  }

  async #gradientFiles(): Promise<{ name: string; sessionId: string; step: number; microbatch: number }[]> {
    const out: { name: string; sessionId: string; step: number; microbatch: number }[] = [];
    for (const name of await readdir(this.#dir)) {
      const m = GRADIENTS_FILE.exec(name);
      if (m !== null) out.push({ name, sessionId: m[1], step: Number(m[2]), microbatch: Number(m[3]) });
    }
    return out;
  }

  async loadAll(): Promise<HeldAdapterSnapshot[]> {
    const out: HeldAdapterSnapshot[] = [];
    const gradients = await this.#gradientFiles();
    const stale: string[] = [];
    for (const name of (await readdir(this.#dir)).filter((n) => n.endsWith('.json')).sort()) {
      const file = join(this.#dir, name);
      const raw = await readJsonState(file);
      if (raw === undefined) continue;
      const snapshot = parseSnapshot(raw, file);
      // The step in progress: the latest after the last commit (a later step's first backward started it anew).
      const mine = gradients.filter((f) => f.sessionId === snapshot.sessionId);
      // Steps count from 0: before the first commit every step's files are the step in progress.
      const committed = snapshot.last?.step ?? -1;
      const step = Math.max(-1, ...mine.filter((f) => f.step > committed).map((f) => f.step));
      for (const f of mine) if (f.step !== step) stale.push(f.name);
      const files = mine.filter((f) => f.step === step).sort((a, b) => a.microbatch - b.microbatch);
      if (files.length > 0) {
        const lengths = snapshot.params.map((p) => p.value.length);
        const microbatches = new Map(snapshot.pending?.step === step ? snapshot.pending.microbatches : []);
        for (const f of files) {
          microbatches.set(f.microbatch, splitGradients(await readFile(join(this.#dir, f.name)), lengths, join(this.#dir, f.name)));
          this.#track(f.sessionId, f.name, f.step);
        }
        snapshot.pending = { step, microbatches: [...microbatches].sort((a, b) => a[0] - b[0]) };
      }
      out.push(snapshot);
    }
    // Gradient files of no checkpoint (its session was removed midway) or of a step already applied.
    const known = new Set(out.map((s) => s.sessionId));
    for (const f of gradients) if (!known.has(f.sessionId)) stale.push(f.name);
    for (const name of stale) await rm(join(this.#dir, name), { force: true });
    if (stale.length > 0) await syncDir(this.#dir);
    return out;
  }
}

export function splitGradients(bytes: Uint8Array, lengths: readonly number[], file: string): Float32Array[] {
  const total = lengths.reduce((n, l) => n + l, 0);
  if (bytes.length !== total * 4) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `the gradients have ${bytes.length} bytes; the adapter's tensors need ${total * 4}` });
  const all = new Float32Array(total);
  new Uint8Array(all.buffer).set(bytes);
  return splitFloat32(all, lengths);
}

export function parseSnapshot(raw: Record<string, unknown>, file: string): HeldAdapterSnapshot {
  const bad = (reason: string): CloudError => new CloudError('TANDEM_STATE_INVALID', { file, reason });
  if (typeof raw.sessionId !== 'string' || !SESSION_ID.test(raw.sessionId) || typeof raw.tenant !== 'string') throw bad('no session id or tenant');
  if (typeof raw.spec !== 'object' || raw.spec === null || !Array.isArray(raw.layers) || !Array.isArray(raw.params) || !Number.isInteger(raw.optimizerSteps)) throw bad('missing fields');
  const params = (raw.params as Record<string, unknown>[]).map((p): HeldParamSnapshot => {
    const shape = p.shape as [number, number];
    if (typeof p.key !== 'string' || !Array.isArray(shape) || shape.length !== 2 || !shape.every((d) => Number.isInteger(d) && d > 0)) throw bad('a tensor without key or shape');
    const n = shape[0] * shape[1];
    return { key: p.key, shape, value: f32(p.value, file, n), expAvg: f32(p.expAvg, file, n), expAvgSq: f32(p.expAvgSq, file, n) };
  });
  const last = raw.last as { step: number; middleGradSquareSum: number } | null;
  const pendingRaw = raw.pending as { step: number; microbatches: [number, string[]][] } | null;
  const pending = pendingRaw === null || pendingRaw === undefined ? undefined : {
    step: pendingRaw.step,
    microbatches: pendingRaw.microbatches.map(([mb, grads]): [number, Float32Array[]] => [mb, grads.map((g, i) => f32(g, file, params[i]?.value.length ?? 0))]),
  };
  return {
    sessionId: raw.sessionId, tenant: raw.tenant, spec: raw.spec as MiddleAdapterSpec, layers: raw.layers as number[], optimizerSteps: raw.optimizerSteps as number,
    ...(last ? { last } : {}), params, ...(pending ? { pending } : {}),
  };
}
