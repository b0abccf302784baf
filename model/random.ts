// A seeded generator whose whole state can be saved and restored, so that a resumed
// run draws exactly the numbers the uninterrupted run would have drawn.

/** xoshiro128** seeded through splitmix32. */
export class Rng {
  private s: Uint32Array;

  constructor(seed: number | Uint32Array = 0) {
    if (seed instanceof Uint32Array) {
      if (seed.length !== 4) throw new RangeError('Rng state must have 4 words');
      this.s = Uint32Array.from(seed);
      return;
    }
    this.s = new Uint32Array(4);
    let x = seed >>> 0;
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      this.s[i] = (z ^ (z >>> 16)) >>> 0;
    }
    if (this.s.every((w) => w === 0)) this.s[0] = 1;
  }

  /** The state, for checkpoints. */
  state(): number[] {
    return Array.from(this.s);
  }

  /** Continues from a saved state in place, for holders of this generator. */
  restore(state: readonly number[]): void {
    if (state.length !== 4 || state.every((w) => w === 0)) throw new RangeError('Rng state must be 4 words, not all zero');
    this.s = Uint32Array.from(state, (w) => w >>> 0);
  }

  static fromState(state: readonly number[]): Rng {
    return new Rng(Uint32Array.from(state));
  }

  /** A uniform 32-bit unsigned integer. */
  nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform in [0, 1) with 32 bits of resolution. */
  next(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Standard normal (Box-Muller). */
  normal(): number {
    let u = this.next();
    while (u === 0) u = this.next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }

  /** A seed for a tfjs op that takes one (dropout, random initializers). */
  seed(): number {
    return this.nextU32();
  }

  /** Fisher-Yates shuffle in place. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const tmp = items[i];
      items[i] = items[j];
      items[j] = tmp;
    }
    return items;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
