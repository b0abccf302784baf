// int8 blockwise absmax with WebAssembly SIMD (int8-block.wat): f32x4 abs and max for the
// absmax, f32x4.nearest and saturating narrowing for the quantization, four lanes at a time.
// Plain JS cannot go under about one nanosecond per element here; this runs several times
// faster. Where WebAssembly SIMD is missing, `int8Kernel()` is undefined and the JS loops run.
import { INT8_BLOCK_WASM_BASE64 } from './int8-block.generated.ts';

// The few WebAssembly globals used here (the project's TypeScript libs have no DOM types).
interface WasmMemory {
  readonly buffer: ArrayBuffer;
  grow(pages: number): number;
}
declare const WebAssembly: {
  validate(bytes: Uint8Array): boolean;
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { exports: unknown };
};

interface Exports {
  memory: WasmMemory;
  quantize(x: number, n: number, q: number, scales: number, block: number): number;
  dequantize(q: number, n: number, scales: number, block: number, out: number): void;
}

export interface Int8Kernel {
  /** Quantizes whole blocks of x (x.length a multiple of blockSize, blockSize a multiple of 16); returns the first block with a NaN or an infinity, or -1. */
  quantize(x: Float32Array, blockSize: number, q: Int8Array, scales: Float32Array): number;
  /** out = q * scale per block (out.length a multiple of blockSize, blockSize a multiple of 16). */
  dequantize(q: Int8Array, scales: Float32Array, blockSize: number, out: Float32Array): void;
}

const PAGE = 65536;

function decodeBase64(text: string): Uint8Array {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

function instantiate(): Int8Kernel | undefined {
  let exports: Exports;
  try {
    const bytes = decodeBase64(INT8_BLOCK_WASM_BASE64);
    if (typeof WebAssembly === 'undefined' || !WebAssembly.validate(bytes)) return undefined;
    exports = new WebAssembly.Instance(new WebAssembly.Module(bytes)).exports as Exports;
  } catch {
    return undefined;
  }
  const memory = exports.memory;
  /** Room for `bytes` at offset 0, growing the module's memory when needed. */
  const heap = (bytes: number): ArrayBuffer => {
    const have = memory.buffer.byteLength;
    if (bytes > have) memory.grow(Math.ceil((bytes - have) / PAGE));
    return memory.buffer;
  };
  const align16 = (n: number): number => (n + 15) & ~15;
  return {
    quantize(x, blockSize, q, scales) {
      const n = x.length;
      const blocks = n / blockSize;
      const xAt = 0;
      const qAt = align16(xAt + n * 4);
      const sAt = align16(qAt + n);
      const buffer = heap(sAt + blocks * 4);
      new Float32Array(buffer, xAt, n).set(x);
      const bad = exports.quantize(xAt, n, qAt, sAt, blockSize);
      q.set(new Int8Array(buffer, qAt, n));
      scales.set(new Float32Array(buffer, sAt, blocks));
      return bad;
    },
    dequantize(q, scales, blockSize, out) {
      const n = out.length;
      const blocks = n / blockSize;
      const qAt = 0;
      const sAt = align16(qAt + n);
      const oAt = align16(sAt + blocks * 4);
      const buffer = heap(oAt + n * 4);
      new Int8Array(buffer, qAt, n).set(q.subarray(0, n));
      new Float32Array(buffer, sAt, blocks).set(scales.subarray(0, blocks));
      exports.dequantize(qAt, n, sAt, blockSize, oAt);
      out.set(new Float32Array(buffer, oAt, n));
    },
  };
}

let kernel: Int8Kernel | undefined | null = null;

/** The SIMD kernel, or undefined where this runtime has no WebAssembly SIMD. */
export function int8Kernel(): Int8Kernel | undefined {
  if (kernel === null) kernel = instantiate();
  return kernel;
}
