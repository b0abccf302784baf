import type { ConfigOf, Field } from '../fields.ts';
import { configError, int, layerList, num, oneOf, readJson, readSpec, writeJson } from '../fields.ts';
import type { SublayerKind } from '../../hooks.ts';

const SUBLAYERS: readonly SublayerKind[] = ['attention', 'mlp'];

const sublayers: Field<SublayerKind[]> = {
  json: 'sublayers',
  read(v, at) {
    if (v === undefined || v === null) return [...SUBLAYERS];
    if (!Array.isArray(v) || v.length === 0 || v.some((s) => !SUBLAYERS.includes(s)) || new Set(v).size !== v.length) {
      throw configError(at, `must be a non-empty list of distinct "attention", "mlp"; got ${JSON.stringify(v)}`);
    }
    return [...v] as SublayerKind[];
  },
};

/** Houlsby-style bottleneck adapters; PEFT has none, so these names are Tandem's (see README.md). */
export const BOTTLENECK_FIELDS = {
  bottleneckSize: int('bottleneck_size', { min: 1, default: 16 }),
  nonLinearity: oneOf('non_linearity', ['relu', 'gelu', 'silu', 'tanh'], 'relu'),
  /** serial: adapts the sublayer's output (Houlsby); parallel: reads the sublayer's input, adds beside it (He et al.). */
  placement: oneOf('placement', ['serial', 'parallel'], 'serial'),
  sublayers,
  scaling: num('scaling', { min: 0, minExclusive: true, default: 1 }),
  layersToTransform: layerList('layers_to_transform'),
};

export type BottleneckConfig = ConfigOf<typeof BOTTLENECK_FIELDS>;

export const bottleneckConfigFromSpec = (spec: Readonly<Record<string, unknown>>): BottleneckConfig => readSpec(BOTTLENECK_FIELDS, spec, 'bottleneck');
export const bottleneckConfigFromJson = (json: Readonly<Record<string, unknown>>, file: string): BottleneckConfig => readJson(BOTTLENECK_FIELDS, json, file);
export const bottleneckConfigToJson = (c: BottleneckConfig): Record<string, unknown> => ({ peft_type: 'TANDEM_BOTTLENECK', ...writeJson(BOTTLENECK_FIELDS, c) });
