// float32 <-> IEEE 754 binary16 bit patterns, round to nearest even, with subnormals,
// infinities and NaN.

/** binary16 bits of the float32 with bits `x` (an unsigned or signed 32-bit integer). */
export function f32BitsToF16(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const abs = x & 0x7fffffff;
  if (abs >= 0x7f800000) return sign | (abs > 0x7f800000 ? 0x7e00 : 0x7c00);
  // 65520 is halfway between 65504 (the largest half) and 65536: ties to even round up to infinity.
  if (abs >= 0x477ff000) return sign | 0x7c00;
  if (abs < 0x38800000) {
    // Subnormal half: units of 2^-24. Below 2^-25 everything rounds to zero.
    if (abs < 0x33000000) return sign;
    const e = abs >>> 23;
    const m = (abs & 0x7fffff) | 0x800000;
    const shift = 126 - e;
    let h = m >>> shift;
    const rest = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rest > half || (rest === half && (h & 1) === 1)) h++;
    return sign | h;
  }
  // Normal: rebias the exponent (127 -> 15) and round 23 mantissa bits to 10, to nearest
  // even without a branch (adding 0xfff plus the kept low bit, then truncating). A carry out
  // of the mantissa correctly bumps the exponent.
  return sign | ((abs - 0x38000000 + 0xfff + ((abs >>> 13) & 1)) >>> 13);
}

export function f16ToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m === 0 ? sign * Infinity : NaN;
  return sign * (1024 + m) * 2 ** (e - 25);
}

let table: Float32Array | null = null;

/** All 65536 half values as float32, built on first use (256 KiB). */
export function f16Table(): Float32Array {
  if (table === null) {
    table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) table[h] = f16ToNumber(h);
  }
  return table;
}
