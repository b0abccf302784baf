// Limits a session puts on what it accepts, exchanged in Hello/Welcome.
import type { Limits } from './messages.ts';

/** Defaults when a peer states no limit (a wire value of 0). */
export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxFrameBytes: 256 * 1024 * 1024,
  maxMessageBytes: 4 * 1024 * 1024,
  maxRank: 8,
  maxDim: 1 << 24,
  maxElements: 1 << 26,
});

/** The stricter of two limit sets, field by field; 0 means "not stated". */
export function intersectLimits(a: Partial<Limits>, b: Partial<Limits> = DEFAULT_LIMITS): Limits {
  const pick = (key: keyof Limits): number => {
    const x = a[key] || DEFAULT_LIMITS[key];
    const y = b[key] || DEFAULT_LIMITS[key];
    return Math.min(x, y);
  };
  return {
    maxFrameBytes: pick('maxFrameBytes'),
    maxMessageBytes: pick('maxMessageBytes'),
    maxRank: pick('maxRank'),
    maxDim: pick('maxDim'),
    maxElements: pick('maxElements'),
  };
}
