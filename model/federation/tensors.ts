// Named adapter tensors as the federation math sees them: PEFT key -> (shape, float32 data).
// Updates travel and aggregate as one flat vector in the key order of the global adapter.
import { FederationError } from './errors.ts';

export interface NamedTensor {
  shape: number[];
  data: Float32Array;
}
export type TensorSet = Record<string, NamedTensor>;

/** The layout of a tensor set: sorted keys and shapes, so every party flattens the same way. */
export interface Layout {
  keys: string[];
  shapes: number[][];
  size: number;
}

export function layoutOf(set: TensorSet): Layout {
  const keys = Object.keys(set).sort();
  const shapes = keys.map((k) => [...set[k].shape]);
  let size = 0;
  for (const k of keys) {
    const n = set[k].shape.reduce((a, b) => a * b, 1);
    if (n !== set[k].data.length) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `tensor ${k} has ${set[k].data.length} values, its shape says ${n}`, { field: k });
    size += n;
  }
  return { keys, shapes, size };
}

export function flatten(set: TensorSet, layout: Layout = layoutOf(set)): Float32Array {
  const out = new Float32Array(layout.size);
  let o = 0;
  for (let i = 0; i < layout.keys.length; i++) {
    const t = set[layout.keys[i]];
    if (!t) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `tensor ${layout.keys[i]} is missing`, { field: layout.keys[i] });
    if (t.shape.length !== layout.shapes[i].length || t.shape.some((d, j) => d !== layout.shapes[i][j])) {
      throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `tensor ${layout.keys[i]} has shape [${t.shape}], expected [${layout.shapes[i]}]`, { field: layout.keys[i] });
    }
    out.set(t.data, o);
    o += t.data.length;
  }
  return out;
}

export function unflatten(vec: Float32Array, layout: Layout): TensorSet {
  checkSize(vec, layout.size, 'update');
  const out: TensorSet = {};
  let o = 0;
  for (let i = 0; i < layout.keys.length; i++) {
    const n = layout.shapes[i].reduce((a, b) => a * b, 1);
    out[layout.keys[i]] = { shape: [...layout.shapes[i]], data: vec.slice(o, o + n) };
    o += n;
  }
  return out;
}

export function checkSize(vec: ArrayLike<number>, size: number, field: string): void {
  if (vec.length !== size) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `${field} has ${vec.length} values, expected ${size}`, { field, details: { size: vec.length, expected: size } });
}

export function checkFinite(vec: ArrayLike<number>, field: string): void {
  for (let i = 0; i < vec.length; i++) {
    if (!Number.isFinite(vec[i])) throw new FederationError('TANDEM_FED_UPDATE_NON_FINITE', `${field}[${i}] is ${vec[i]}`, { field, details: { index: i } });
  }
}

export function l2Norm(vec: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < vec.length; i++) s += vec[i] * vec[i];
  return Math.sqrt(s);
}
