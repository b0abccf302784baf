// Block ranges of a served model: what a worker owns (`--blocks 2-16`, [2, 16)), and the
// chain of owned ranges that covers a session's middle (a pipeline when no one range does).
import type { BlockRange } from '../middle-runner.ts';
import { ClusterError } from './errors.ts';

/** `A-B` → [A, B); within [0, numLayers) when it is known. */
export function parseBlockRange(text: string, numLayers?: number): BlockRange {
  const match = /^(\d{1,4})-(\d{1,4})$/.exec(text.trim());
  if (match === null) throw new ClusterError('TANDEM_CLUSTER_BLOCKS_INVALID', { blocks: JSON.stringify(text.slice(0, 40)), reason: 'write START-END, e.g. 2-16 for blocks [2, 16)' });
  const start = Number(match[1]);
  const end = Number(match[2]);
  if (end <= start) throw new ClusterError('TANDEM_CLUSTER_BLOCKS_INVALID', { blocks: text, reason: 'END must be above START' });
  if (numLayers !== undefined && end > numLayers) throw new ClusterError('TANDEM_CLUSTER_BLOCKS_INVALID', { blocks: text, reason: `the model has ${numLayers} blocks` });
  return { start, end };
}

/** `2-8,8-14` → ranges, each checked. */
export function parseBlockRanges(text: string, numLayers?: number): BlockRange[] {
  const parts = text.split(',');
  if (parts.length > 64) throw new ClusterError('TANDEM_CLUSTER_BLOCKS_INVALID', { blocks: `${parts.length} ranges`, reason: 'at most 64' });
  return parts.map((part) => parseBlockRange(part, numLayers));
}

export function rangeName(range: BlockRange): string {
  return `${range.start}-${range.end}`;
}

/** One link of a pipeline: blocks `blocks` computed by a worker owning `owner`. */
export interface PipelineSegment {
  owner: BlockRange;
  blocks: BlockRange;
}

/**
 * The owned ranges that compute `wanted` in order: at each block the owner reaching furthest.
 * undefined when some block of `wanted` has no owner.
 */
export function coverRange(wanted: BlockRange, owned: readonly BlockRange[]): PipelineSegment[] | undefined {
  const segments: PipelineSegment[] = [];
  let at = wanted.start;
  while (at < wanted.end) {
    let best: BlockRange | undefined;
    for (const r of owned) if (r.start <= at && r.end > at && (best === undefined || r.end > best.end)) best = r;
    if (best === undefined) return undefined;
    const end = Math.min(best.end, wanted.end);
    segments.push({ owner: best, blocks: { start: at, end } });
    at = end;
  }
  return segments;
}
