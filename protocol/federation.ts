// The REST bodies of federations (under /v1/federations): cloud-node's coordinator returns
// them and edge-client reads them. Tensors travel as base64 of little-endian float32.

export const FEDERATION_MODES = ['split', 'offsite'] as const;
export type FederationMode = (typeof FEDERATION_MODES)[number];
/**
 * fedavg, fedadam, median, trimmed-mean act on the flat delta; ffa-lora freezes every LoRA A
 * (owners train B only, the cloud averages B); exact-product averages each ΔW = B·A and
 * refactors the mean to rank r.
 */
export const FEDERATION_AGGREGATIONS = ['fedavg', 'fedadam', 'median', 'trimmed-mean', 'ffa-lora', 'exact-product'] as const;
export type FederationAggregation = (typeof FEDERATION_AGGREGATIONS)[number];

/** One adapter tensor on the wire. */
export interface WireTensor {
  shape: number[];
  /** base64 of little-endian float32 values. */
  data: string;
}

/** A PEFT adapter on the wire: adapter_config.json's text and its tensors by PEFT key. */
export interface WireAdapter {
  config: string;
  tensors: Record<string, WireTensor>;
}

export interface FederationDp {
  /** L2 norm every owner's update is clipped to. */
  clipNorm: number;
  /** σ: the noise on the sum has std σ·clipNorm. */
  noiseMultiplier: number;
  delta: number;
  /** ε the federation may spend in total; a round that would exceed it is refused. */
  epsilonBudget: number;
}

/** Blocks on the edge in split mode: B at the bottom, T at the top (the cloud runs the rest). */
export interface FederationCut {
  bottom: number;
  top: number;
}

/** POST /v1/federations. */
export interface FederationCreate {
  id: string;
  model: string;
  mode: FederationMode;
  /** Split mode: where the model is cut (the model's default cut when absent); the adapter must live on the edge's blocks. */
  cut?: FederationCut;
  adapter: WireAdapter;
  rounds: number;
  /** Tenants invited. */
  owners: string[];
  /** Owners sampled per round. */
  sampleSize: number;
  /** Fewest updates a round completes with. */
  minOwners: number;
  /** At most MAX_LOCAL_STEPS. */
  localSteps: number;
  /** FedProx: μ of the proximal term μ/2·‖w − w_global‖² in every owner's loss (0 or absent: FedAvg's local training). */
  fedproxMu?: number;
  /** At most MAX_ROUND_DEADLINE_SECONDS. */
  roundDeadlineSeconds: number;
  /**
   * An owner that took up the round attempt (called in it) and has not called since for this
   * long (its heartbeats, POST .../rounds/:round/alive, count) is taken as gone: once every owner
   * the attempt still waits on is gone, the round moves on as at its deadline. An owner that has
   * not called in the attempt yet is waited for until the deadline. 1..roundDeadlineSeconds;
   * min(DEFAULT_OWNER_TIMEOUT_SECONDS, roundDeadlineSeconds) when absent.
   */
  ownerTimeoutSeconds?: number;
  aggregation: FederationAggregation;
  trimFraction?: number;
  serverLearningRate?: number;
  secureAggregation: boolean;
  dp?: FederationDp;
}

/** GET /v1/federations/:id/round: what an owner does next. */
export interface RoundAssignment {
  federation: string;
  round: number;
  attempt: number;
  /** open: updates are taken; done: every round is complete; stopped: refused by the privacy budget. */
  state: 'open' | 'done' | 'stopped';
  sampled: boolean;
  /** Whether this owner's update for this round and attempt is in. */
  submitted: boolean;
  deadline: string;
  localSteps: number;
  mode: FederationMode;
  /** Split mode: the federation's cut, when it names one. */
  cut?: FederationCut;
  /** FedProx's μ, when the federation sets one above 0. */
  fedproxMu?: number;
  /** The aggregation: under ffa-lora the owner freezes every LoRA A. */
  aggregation: FederationAggregation;
  model: string;
  dp?: { clipNorm: number; noiseMultiplier: number };
  secureAggregation: boolean;
  /** The caller's tenant: its name in the round's secure aggregation. */
  owner: string;
  /** Owners sampled in this attempt. */
  sampledOwners: string[];
  /** The global adapter, for a sampled owner that has not submitted. */
  adapter?: WireAdapter;
  /** FederationCreate.ownerTimeoutSeconds: a sampled owner calls at least this often (RoundAlive) until its part of the round is done. */
  ownerTimeoutSeconds?: number;
}

/** POST /v1/federations/:id/rounds/:round/alive, body { attempt }: an owner's heartbeat while it trains. */
export interface RoundAlive {
  federation: string;
  round: number;
  attempt: number;
  state: 'open' | 'done' | 'stopped';
  /** Whether the round and attempt the owner named are still open and it is sampled in them: false, the round moved on without it. */
  current: boolean;
}

/** POST /v1/federations/:id/rounds/:round/updates. */
export interface RoundUpdate {
  attempt: number;
  /** Examples trained on: FedAvg's weight. */
  examples: number;
  /** Delta from the global adapter, flat in sorted-key order, base64 float32 (plain aggregation). */
  values?: string;
  /** Under secure aggregation: examples·delta in fixed point, masked, base64 of little-endian uint32. */
  masked?: string;
  loss: number;
  validation?: { loss: number; accuracy?: number };
}

export interface RoundUpdateAck {
  federation: string;
  round: number;
  attempt: number;
  accepted: true;
  received: number;
}

export interface RoundRecord {
  round: number;
  attempt: number;
  sampled: string[];
  participants: string[];
  examples: number;
  /** Mean training loss of the participants, weighted by examples. */
  loss: number | null;
  validation: Record<string, { loss: number; accuracy?: number }>;
  bytesReceived: number;
  bytesSent: number;
  epsilon: number | null;
  /**
   * LoRA-aware aggregation (exact-product): over the LoRA pairs, the largest relative error
   * of the rank-r refactoring ‖mean(BA) − B'A'‖/‖mean(BA)‖, and the one naive averaging of A and
   * B would have made, ‖mean(BA) − mean(B)·mean(A)‖/‖mean(BA)‖.
   */
  lora?: { refactorError: number; naiveError: number };
  completedAt: string;
}

/** GET /v1/federations/:id. */
export interface FederationStatus {
  id: string;
  model: string;
  mode: FederationMode;
  state: 'open' | 'done' | 'stopped';
  round: number;
  rounds: number;
  attempt: number;
  owners: string[];
  aggregation: FederationAggregation;
  secureAggregation: boolean;
  epsilon: number | null;
  delta: number | null;
  current: { sampled: string[]; received: string[]; deadline: string };
  history: RoundRecord[];
  rejected: Record<string, number>;
}

export function encodeFloat32(values: Float32Array): string {
  return Buffer.from(values.buffer, values.byteOffset, values.byteLength).toString('base64');
}

/** Decodes base64 float32; null when the text is not base64 of a whole number of floats. */
export function decodeFloat32(text: string): Float32Array | null {
  if (typeof text !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) return null;
  const bytes = Buffer.from(text, 'base64');
  if (bytes.length % 4 !== 0) return null;
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = bytes.readFloatLE(i * 4);
  return out;
}

export const SECAGG_PHASES = ['keys', 'shares', 'masked', 'reveal'] as const;
export type SecAggPhase = (typeof SECAGG_PHASES)[number];

/** A Shamir share on the wire. */
export interface WireShare {
  x: number;
  y: string;
}

/** GET /v1/federations/:id/rounds/:round/secagg: the caller's view of the round's secure aggregation. */
export interface SecAggView {
  round: number;
  attempt: number;
  phase: SecAggPhase;
  threshold: number;
  /** The label masks are expanded under. */
  label: string;
  sampled: string[];
  /** From phase shares on: the owners' advertised keys. */
  advertised: { owner: string; cipherPublic: string; maskPublic: string }[];
  /** From phase masked on: the encrypted shares addressed to the caller. */
  shares: { from: string; to: string; box: string }[];
  /** In phase reveal: the owners whose masked inputs are in. */
  survivors: string[];
}

/** POST .../secagg/keys. */
export interface SecAggKeys {
  attempt: number;
  cipherPublic: string;
  maskPublic: string;
}

/** POST .../secagg/shares. */
export interface SecAggShares {
  attempt: number;
  shares: { from: string; to: string; box: string }[];
}

/** POST .../secagg/reveal. */
export interface SecAggReveal {
  attempt: number;
  selfMask: Record<string, WireShare>;
  maskKey: Record<string, WireShare>;
}

/** base64 of little-endian uint32 words (masked SecAgg inputs: every bit pattern is valid). */
export function encodeUint32(values: Uint32Array): string {
  const b = Buffer.alloc(values.length * 4);
  for (let i = 0; i < values.length; i++) b.writeUInt32LE(values[i], i * 4);
  return b.toString('base64');
}

export function decodeUint32(text: string): Uint32Array | null {
  if (typeof text !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) return null;
  const bytes = Buffer.from(text, 'base64');
  if (bytes.length % 4 !== 0) return null;
  const out = new Uint32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = bytes.readUInt32LE(i * 4);
  return out;
}

/** The longest a round may take (FederationCreate.roundDeadlineSeconds): a week. */
export const MAX_ROUND_DEADLINE_SECONDS = 7 * 86_400;

/** FederationCreate.ownerTimeoutSeconds when absent (at most the round's deadline). */
export const DEFAULT_OWNER_TIMEOUT_SECONDS = 60;

/** The most local steps an owner trains a round (FederationCreate.localSteps). */
export const MAX_LOCAL_STEPS = 100_000;
