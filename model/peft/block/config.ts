import type { ConfigOf } from '../fields.ts';
import { layerList, readJson, readSpec, writeJson } from '../fields.ts';

/** Whole trainable blocks (Offsite-Tuning's adapter). Tandem's format (see README.md). */
export const BLOCK_FIELDS = {
  layersToTransform: layerList('layers_to_transform', { required: 'name the blocks to train, e.g. [0, 1, 10, 11] for two at the bottom and two at the top' }),
};

export type BlockConfig = ConfigOf<typeof BLOCK_FIELDS>;

export const blockConfigFromSpec = (spec: Readonly<Record<string, unknown>>): BlockConfig => readSpec(BLOCK_FIELDS, spec, 'block');
export const blockConfigFromJson = (json: Readonly<Record<string, unknown>>, file: string): BlockConfig => readJson(BLOCK_FIELDS, json, file);
export const blockConfigToJson = (c: BlockConfig): Record<string, unknown> => ({ peft_type: 'TANDEM_BLOCK', ...writeJson(BLOCK_FIELDS, c) });
