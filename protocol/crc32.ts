// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320). Node's native zlib.crc32 (Node
// 20.15+, 22.2+) where the runtime has it, found without importing anything so protocol/
// stays free of I/O and loads in a browser; elsewhere slicing-by-8 in JS: eight table lookups
// per 8 bytes instead of one per byte.

type NativeCrc32 = (data: Uint8Array, value?: number) => number;

/** zlib.crc32 when the runtime has it (process.getBuiltinModule is Node's), else undefined. */
function findNativeCrc32(): NativeCrc32 | undefined {
  const proc = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process;
  const zlib = proc?.getBuiltinModule?.('node:zlib') as { crc32?: NativeCrc32 } | undefined;
  return typeof zlib?.crc32 === 'function' ? zlib.crc32 : undefined;
}

const nativeCrc32 = findNativeCrc32();

/** Which implementation crc32 uses here. */
export const CRC32_IMPLEMENTATION: 'native' | 'js' = nativeCrc32 ? 'native' : 'js';

const TABLES = (() => {
  const t = new Int32Array(8 * 256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  for (let n = 0; n < 256; n++) {
    let c = t[n];
    for (let k = 1; k < 8; k++) {
      c = t[c & 0xff] ^ (c >>> 8);
      t[k * 256 + n] = c;
    }
  }
  return t;
})();

/**
 * Continues a CRC-32 over `bytes`. Start with crc 0; chain calls to cover several buffers.
 * No bytes continue nothing: Node 20's zlib.crc32 answers 0 for an empty array whose buffer was
 * ever read (its data pointer is then null), whatever crc it continues, so every frame whose
 * empty `indices` shared that array checksummed to 0.
 */
export function crc32(bytes: Uint8Array, crc = 0): number {
  if (bytes.length === 0) return crc >>> 0;
  return nativeCrc32 ? nativeCrc32(bytes, crc) : crc32Js(bytes, crc);
}

/** The JS implementation, used where zlib.crc32 is absent (and tested against it). */
export function crc32Js(bytes: Uint8Array, crc = 0): number {
  // Whole 32-bit words are about twice as fast to read, when the view is aligned for them.
  if ((bytes.byteOffset & 3) === 0 && bytes.length >= 64) return crc32Words(bytes, crc);
  return crc32Bytes(bytes, 0, ~crc);
}

function crc32Bytes(bytes: Uint8Array, from: number, c: number): number {
  const t = TABLES;
  for (let i = from; i < bytes.length; i++) c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

function crc32Words(bytes: Uint8Array, crc: number): number {
  const t = TABLES;
  // Little-endian words: the first byte of the stream is the low byte of the word.
  const w = new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length >> 2);
  const pairs = w.length & ~1;
  let c = ~crc;
  for (let j = 0; j < pairs; j += 2) {
    const lo = c ^ w[j];
    const hi = w[j + 1];
    c = t[1792 + (lo & 0xff)] ^ t[1536 + ((lo >>> 8) & 0xff)] ^ t[1280 + ((lo >>> 16) & 0xff)] ^ t[1024 + (lo >>> 24)] ^
      t[768 + (hi & 0xff)] ^ t[512 + ((hi >>> 8) & 0xff)] ^ t[256 + ((hi >>> 16) & 0xff)] ^ t[hi >>> 24];
  }
  return crc32Bytes(bytes, pairs * 4, c);
}
