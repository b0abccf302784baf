// Where a tensor sits in the decoder and in the cut (DESIGN.md, "The cut"):
//   edge  : embedding, blocks [0, B)          bottom
//   cloud : blocks [B, L-T)                   middle
//   edge  : blocks [L-T, L), final norm, head top
// Tensor and module names follow Hugging Face's LLaMA layout (`model.layers.{i}.…`); adapter
// keys carry the same path after PEFT's prefix, so these functions read both.

/** B blocks on the edge below the middle, T above it. Structurally the same as protocol's Cut. */
export interface CutSpec {
  bottom: number;
  top: number;
}

/** Which part of the model a tensor belongs to: one of the blocks' three parts, or outside the blocks. */
export type CutPart = 'embedding' | 'bottom' | 'middle' | 'top' | 'head';

export const CUT_PARTS: readonly CutPart[] = ['embedding', 'bottom', 'middle', 'top', 'head'];

const LAYER_IN_NAME = /(^|\.)model\.layers\.(\d+)\./;

/** The block index a tensor, module or adapter key refers to (`model.layers.{i}.`), if any. */
export function layerOf(name: string): number | undefined {
  const m = LAYER_IN_NAME.exec(name);
  return m === null ? undefined : Number(m[2]);
}

/** Renames the block index in a tensor or adapter key; names without one stay. */
export function renameLayer(name: string, map: (layer: number) => number): string {
  return name.replace(LAYER_IN_NAME, (_, lead: string, i: string) => `${lead}model.layers.${map(Number(i))}.`);
}

/** The part of the cut block `layer` of `numLayers` falls in. */
export function cutPartOfLayer(layer: number, cut: CutSpec, numLayers: number): 'bottom' | 'middle' | 'top' {
  if (layer < cut.bottom) return 'bottom';
  return layer >= numLayers - cut.top ? 'top' : 'middle';
}

/**
 * The part of the cut a tensor belongs to: a block's tensor by its block; outside the blocks,
 * the token embedding is 'embedding' and everything after the blocks (final norm, lm_head) 'head'.
 */
export function cutPartOf(name: string, cut: CutSpec, numLayers: number): CutPart {
  const layer = layerOf(name);
  if (layer !== undefined) return cutPartOfLayer(layer, cut, numLayers);
  return /(^|\.)embed_tokens\./.test(name) ? 'embedding' : 'head';
}

/** Whether a tensor is held by the edge at this cut (everything but the middle). */
export function onEdge(name: string, cut: CutSpec, numLayers: number): boolean {
  return cutPartOf(name, cut, numLayers) !== 'middle';
}
