// The result shapes of the cloud's REST API under /v1: cloud-node returns them and
// edge-client reads them. Field names are the JSON's.
import type { Cut } from './messages.ts';

/** The cuts a node allows. */
export interface CutLimits {
  minBottom: number;
  minTop: number;
  maxBottomPlusTop: number;
}

/** One model of GET /v1/models. */
export interface ModelDescription {
  id: string;
  modelType: string;
  /** "sha256:<hex>" of what the weights compute. */
  contentHash: string;
  numLayers: number;
  /** config.json as the model folder has it. */
  config: Record<string, unknown>;
  cuts: CutLimits;
  defaultCut: Cut;
}

/** One file of an edge part or an emulator bundle. */
export interface FileEntry {
  name: string;
  bytes: number;
  sha256: string;
}

/** GET /v1/models/:id/edge?bottom&top. */
export interface EdgeManifest {
  model: string;
  contentHash: string;
  cut: Cut;
  files: FileEntry[];
}

/** Loss figures of one evaluation. */
export interface LmFigures {
  loss: number;
  perplexity: number;
  tokens: number;
  /** Label data only. */
  accuracy?: number;
}

/** What the cloud computes for POST /v1/models/:id/adapters/evaluate. */
export interface AdapterEvaluation {
  /** The served model with the adapter plugged in. */
  plugIn: LmFigures;
  /** The served model alone, on the same data. */
  baseline: LmFigures;
  examples: number;
  peftType: string;
  adapterTensors: number;
}

/** The reply of POST /v1/models/:id/adapters/evaluate. */
export interface PlugInEvaluation extends AdapterEvaluation {
  model: string;
  contentHash: string;
}
