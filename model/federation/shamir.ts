// Shamir secret sharing of 32-byte seeds over the prime field of the Mersenne prime 2^521 − 1
// (larger than any 32-byte secret). Any `threshold` shares give the secret; fewer give nothing.
import { randomBytes } from 'node:crypto';
import { FederationError } from './errors.ts';

export const SHAMIR_PRIME = (1n << 521n) - 1n;

export interface Share {
  /** The evaluation point, 1..n. */
  x: number;
  /** The polynomial's value at x, as lowercase hex. */
  y: string;
}

function mod(a: bigint): bigint {
  const r = a % SHAMIR_PRIME;
  return r < 0n ? r + SHAMIR_PRIME : r;
}

function pow(base: bigint, exp: bigint): bigint {
  let result = 1n;
  let b = mod(base);
  let e = exp;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % SHAMIR_PRIME;
    b = (b * b) % SHAMIR_PRIME;
    e >>= 1n;
  }
  return result;
}

function toBig(bytes: Uint8Array): bigint {
  return bytes.length === 0 ? 0n : BigInt(`0x${Buffer.from(bytes).toString('hex')}`);
}

function randomField(): bigint {
  return mod(toBig(randomBytes(72)));
}

/** Splits a secret of at most 64 bytes into n shares, any `threshold` of which recover it. */
export function splitSecret(secret: Uint8Array, n: number, threshold: number): Share[] {
  if (secret.length > 64) throw new FederationError('TANDEM_FED_SHAMIR_INVALID', `a secret is at most 64 bytes, got ${secret.length}`, { field: 'secret' });
  if (!Number.isInteger(n) || !Number.isInteger(threshold) || threshold < 1 || threshold > n || n > 10_000) {
    throw new FederationError('TANDEM_FED_SHAMIR_INVALID', `need integers 1 <= threshold <= n <= 10000, got threshold ${threshold}, n ${n}`, { field: 'threshold' });
  }
  const coefficients = [toBig(secret)];
  for (let i = 1; i < threshold; i++) coefficients.push(randomField());
  const shares: Share[] = [];
  for (let x = 1; x <= n; x++) {
    let y = 0n;
    const bx = BigInt(x);
    for (let i = coefficients.length - 1; i >= 0; i--) y = mod(y * bx + coefficients[i]);
    shares.push({ x, y: y.toString(16) });
  }
  return shares;
}

/** Recovers a secret of `length` bytes from at least `threshold` distinct shares (Lagrange at 0). */
export function combineShares(shares: readonly Share[], threshold: number, length = 32): Uint8Array {
  const seen = new Set<number>();
  const points: { x: bigint; y: bigint }[] = [];
  for (const s of shares) {
    if (!Number.isInteger(s.x) || s.x < 1 || s.x > 10_000 || typeof s.y !== 'string' || !/^[0-9a-f]{1,131}$/.test(s.y)) {
      throw new FederationError('TANDEM_FED_SHAMIR_INVALID', 'a share needs x in 1..10000 and y as hex of at most 131 digits', { field: 'share' });
    }
    if (seen.has(s.x)) continue;
    seen.add(s.x);
    points.push({ x: BigInt(s.x), y: mod(BigInt(`0x${s.y}`)) });
  }
  if (points.length < threshold) throw new FederationError('TANDEM_FED_SHAMIR_INVALID', `${points.length} distinct shares, the threshold is ${threshold}`, { field: 'shares', details: { have: points.length, threshold } });
  const used = points.slice(0, threshold);
  let secret = 0n;
  for (let i = 0; i < used.length; i++) {
    let num = 1n;
    let den = 1n;
    for (let j = 0; j < used.length; j++) {
      if (i === j) continue;
      num = mod(num * -used[j].x);
      den = mod(den * (used[i].x - used[j].x));
    }
    secret = mod(secret + used[i].y * num * pow(den, SHAMIR_PRIME - 2n));
  }
  const hex = secret.toString(16);
  if (hex.length > length * 2) throw new FederationError('TANDEM_FED_SHAMIR_INVALID', `the recovered secret is longer than ${length} bytes: the shares do not belong together`, { field: 'shares' });
  return Uint8Array.from(Buffer.from(hex.padStart(length * 2, '0'), 'hex'));
}
