// Limits a session puts on what it accepts, exchanged in Hello/Welcome.
import { ProtocolError } from './errors.ts';
import type { Limits } from './messages.ts';

/** Defaults when a peer states no limit (a wire value of 0). */
export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxFrameBytes: 256 * 1024 * 1024,
  maxMessageBytes: 4 * 1024 * 1024,
  maxRank: 8,
  maxDim: 1 << 24,
  maxElements: 1 << 26,
});

/**
 * The smallest value a peer may state for each limit. Below these a chunk carries no data
 * (a few hundred bytes of chunk header), or no hidden-state frame ([batch, seq, hidden]) fits.
 */
export const LIMIT_FLOORS: Readonly<Limits> = Object.freeze({
  maxFrameBytes: 4096,
  maxMessageBytes: 4096,
  maxRank: 3,
  maxDim: 1,
  maxElements: 1,
});

const WIRE_NAMES: Readonly<Record<keyof Limits, string>> = {
  maxFrameBytes: 'max_frame_bytes',
  maxMessageBytes: 'max_message_bytes',
  maxRank: 'max_rank',
  maxDim: 'max_dim',
  maxElements: 'max_elements',
};

/**
 * Throws TANDEM_PROTO_FIELD_INVALID for a stated limit (0 = not stated) that is not an integer
 * or is below its floor; `field` prefixes the wire name, e.g. "hello.limits".
 */
export function checkLimitFloors(limits: Partial<Limits>, field: string): void {
  for (const key of Object.keys(WIRE_NAMES) as (keyof Limits)[]) {
    const value = limits[key];
    if (value === undefined || value === 0) continue;
    if (!Number.isInteger(value) || value < LIMIT_FLOORS[key]) {
      throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: `${field}.${WIRE_NAMES[key]}`, reason: `${value} is below the floor of ${LIMIT_FLOORS[key]}` });
    }
  }
}

/** The stricter of two limit sets, field by field; 0 means "not stated". Never below the floors. */
export function intersectLimits(a: Partial<Limits>, b: Partial<Limits> = DEFAULT_LIMITS): Limits {
  const pick = (key: keyof Limits): number => {
    const x = a[key] || DEFAULT_LIMITS[key];
    const y = b[key] || DEFAULT_LIMITS[key];
    return Math.max(LIMIT_FLOORS[key], Math.min(x, y));
  };
  return {
    maxFrameBytes: pick('maxFrameBytes'),
    maxMessageBytes: pick('maxMessageBytes'),
    maxRank: pick('maxRank'),
    maxDim: pick('maxDim'),
    maxElements: pick('maxElements'),
  };
}
