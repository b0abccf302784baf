// int8 weight quantization of the emulator: per output row (dim 0 of a [out, in] linear
// weight), absmax scaling. Stored in safetensors as the weight in I8 and its scales in F32
// under `<module>.weight_scale` (the name compressed-tensors and vLLM use), dequantized to
// float32 on load: w ≈ q · scale.
import type { SafetensorsTensorInput, Weight } from '../model/index.ts';
import { EmulatorError } from './errors.ts';

export const QUANTIZATIONS = ['int8'] as const;
export type Quantization = (typeof QUANTIZATIONS)[number];

/** Suffix of the scales tensor beside a quantized `.weight`. */
export const SCALE_SUFFIX = '_scale';

/** The linear projections of a block ([out, in] matrices); norms stay float32. */
const LINEAR_WEIGHT = /\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\.weight$/;

export function isQuantizable(name: string, shape: readonly number[]): boolean {
  return shape.length === 2 && LINEAR_WEIGHT.test(name);
}

export interface Int8Rows {
  values: Int8Array;
  /** One float32 scale per row. */
  scales: Float32Array;
}

/** q = round(w / s) with s = max|row| / 127 per row; a zero row gets s = 0 and q = 0. */
export function quantizeInt8Rows(data: Float32Array, rows: number, cols: number): Int8Rows {
  if (data.length !== rows * cols) throw new EmulatorError('TANDEM_EMULATOR_OPTION_INVALID', `a [${rows}, ${cols}] weight needs ${rows * cols} values, got ${data.length}`, { field: 'weight' });
  const values = new Int8Array(rows * cols);
  const scales = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    let max = 0;
    for (let c = 0; c < cols; c++) max = Math.max(max, Math.abs(data[r * cols + c]));
    const s = Math.fround(max / 127);
    scales[r] = s;
    if (s === 0) continue;
    for (let c = 0; c < cols; c++) values[r * cols + c] = Math.max(-127, Math.min(127, Math.round(data[r * cols + c] / s)));
  }
  return { values, scales };
}

export function dequantizeInt8Rows(values: Int8Array, scales: Float32Array, cols: number): Float32Array {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = values[i] * scales[Math.floor(i / cols)];
  return out;
}

/** The tensors to store for weights: linear ones as I8 plus scales when quantizing, the rest F32. */
export function encodeWeights(weights: ReadonlyMap<string, Weight>, quantization: Quantization | null): Map<string, SafetensorsTensorInput> {
  const out = new Map<string, SafetensorsTensorInput>();
  for (const [name, w] of weights) {
    if (quantization === 'int8' && isQuantizable(name, w.shape)) {
      const [rows, cols] = w.shape;
      const q = quantizeInt8Rows(w.data, rows, cols);
      out.set(name, { dtype: 'I8', shape: w.shape, data: q.values });
      out.set(`${name}${SCALE_SUFFIX}`, { dtype: 'F32', shape: [rows], data: q.scales });
    } else {
      out.set(name, { dtype: 'F32', shape: w.shape, data: w.data });
    }
  }
  return out;
}

/** What int8 quantization turns weights into, as float32: the emulator the bundle ships, for measuring it before writing. */
export function roundTrip(weights: ReadonlyMap<string, Weight>, quantization: Quantization | null): Map<string, Weight> {
  if (quantization === null) return new Map(weights);
  const out = new Map<string, Weight>();
  for (const [name, w] of weights) {
    if (!isQuantizable(name, w.shape)) {
      out.set(name, w);
      continue;
    }
    const [rows, cols] = w.shape;
    const q = quantizeInt8Rows(w.data, rows, cols);
    out.set(name, { shape: w.shape, data: dequantizeInt8Rows(q.values, q.scales, cols) });
  }
  return out;
}
