import type { ConfigOf } from '../fields.ts';
import { layerList, readJson, readSpec, writeJson } from '../fields.ts';

/** BitFit (Ben Zaken et al. 2022): only the biases train. Tandem's format (see README.md). */
export const BITFIT_FIELDS = {
  layersToTransform: layerList('layers_to_transform'),
};

export type BitfitConfig = ConfigOf<typeof BITFIT_FIELDS>;

export const bitfitConfigFromSpec = (spec: Readonly<Record<string, unknown>>): BitfitConfig => readSpec(BITFIT_FIELDS, spec, 'bitfit');
export const bitfitConfigFromJson = (json: Readonly<Record<string, unknown>>, file: string): BitfitConfig => readJson(BITFIT_FIELDS, json, file);
export const bitfitConfigToJson = (c: BitfitConfig): Record<string, unknown> => ({ peft_type: 'TANDEM_BITFIT', ...writeJson(BITFIT_FIELDS, c) });
