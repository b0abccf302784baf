// The held middle adapters' checkpoints in the embedded state folder: one JSON file per
// session under `held/`, tensors as base64 float32 (little-endian), written atomically
// (json-file.ts), so that a hard kill leaves the last acknowledged state whole.
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { MiddleAdapterSpec } from '../../protocol/index.ts';
import { CloudError } from '../errors.ts';
import { ensureStateDir, readJsonState, syncDir, tidyStateDir, writeJsonState } from './json-file.ts';

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

const b64 = (a: Float32Array): string => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');

function f32(text: unknown, file: string, length: number): Float32Array {
  if (typeof text !== 'string') throw new CloudError('TANDEM_STATE_INVALID', { file, reason: 'a tensor is not base64 text' });
  const bytes = Buffer.from(text, 'base64');
  if (bytes.length !== length * 4) throw new CloudError('TANDEM_STATE_INVALID', { file, reason: `a tensor has ${bytes.length} bytes, its shape needs ${length * 4}` });
  const out = new Float32Array(length);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

export class HeldAdapterStore {
  readonly #dir: string;

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
    await writeJsonState(this.#file(s.sessionId), {
      sessionId: s.sessionId, tenant: s.tenant, spec: s.spec, layers: s.layers, optimizerSteps: s.optimizerSteps, last: s.last ?? null,
      params: s.params.map((p) => ({ key: p.key, shape: p.shape, value: b64(p.value), expAvg: b64(p.expAvg), expAvgSq: b64(p.expAvgSq) })),
      pending: s.pending === undefined ? null : { step: s.pending.step, microbatches: s.pending.microbatches.map(([mb, grads]) => [mb, grads.map(b64)]) },
    });
  }

  async remove(sessionId: string): Promise<void> {
    await rm(this.#file(sessionId), { force: true });
    await syncDir(this.#dir);
  }

  async loadAll(): Promise<HeldAdapterSnapshot[]> {
    const out: HeldAdapterSnapshot[] = [];
    for (const name of (await readdir(this.#dir)).filter((n) => n.endsWith('.json')).sort()) {
      const file = join(this.#dir, name);
      const raw = await readJsonState(file);
      if (raw === undefined) continue;
      out.push(parseSnapshot(raw, file));
    }
    return out;
  }
}

function parseSnapshot(raw: Record<string, unknown>, file: string): HeldAdapterSnapshot {
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
