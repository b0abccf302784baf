// The TypeScript shape of every protocol v1 message (camelCase mirrors of protocol/proto).
// Enums are names here and numbers on the wire; wire.ts converts.

export interface ProtocolVersion {
  major: number;
  minor: number;
}

/** Inclusive, ordered by (major, minor). */
export interface VersionRange {
  min: ProtocolVersion;
  max: ProtocolVersion;
}

export type DTypeName = 'f32' | 'f16' | 'bf16';
export type CodecName = 'f32' | 'f16' | 'bf16' | 'int8-block' | 'int4-block' | 'topk';
/** How top-k stores its kept values. */
export type TopkValuesCodec = 'f16' | 'int8-block';

export interface CodecParams {
  blockSize: number;
  /** float32 little-endian, one per block. */
  scales: Uint8Array;
  k: number;
  topkValues: TopkValuesCodec | null;
  /** LEB128 varint gaps between kept indices. */
  indices: Uint8Array;
}

export interface TensorFrame {
  name: string;
  dtype: DTypeName;
  shape: number[];
  codec: CodecName;
  params: CodecParams;
  payload: Uint8Array;
  /** CRC-32 of payload, then params.scales, then params.indices. */
  crc32: number;
}

/** A codec with its parameters, as offered in a Hello or chosen in a Welcome. */
export interface CodecSpec {
  codec: CodecName;
  /** int8-block, int4-block and top-k int8 values; 0 means the default (64). */
  blockSize?: number;
  /** top-k: fraction of elements kept, in (0, 1]. */
  topkFraction?: number;
  topkValues?: TopkValuesCodec;
}

export interface ModelRef {
  id: string;
  contentHash: string;
}

export interface Limits {
  maxFrameBytes: number;
  maxMessageBytes: number;
  maxRank: number;
  maxDim: number;
  maxElements: number;
}

export interface Cut {
  bottom: number;
  top: number;
}

export interface TrainingSpec {
  methods: string[];
  cloudMiddleLora: boolean;
  middleLoraRank: number;
  /** v1.3: the adapter the cloud holds on the middle blocks; absent when none. */
  middleAdapter?: MiddleAdapterSpec;
}

/** The middle adapter methods a Hello may ask for (v1.3). */
export const MIDDLE_ADAPTER_METHODS = ['lora', 'ia3'] as const;
export type MiddleAdapterMethod = (typeof MIDDLE_ADAPTER_METHODS)[number];

/** v1.3: the adapter the cloud creates on the middle blocks (see proto/handshake.proto). */
export interface MiddleAdapterSpec {
  method: MiddleAdapterMethod;
  rank: number;
  alpha: number;
  /** target_modules as PEFT writes them, e.g. ["q_proj", "v_proj"]. */
  targets: string[];
  seed: number;
  /** Its index among the methods of an adapter created with `seed` (the edge's methods first). */
  methodIndex: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

export interface CodecOffer {
  forward: CodecSpec[];
  backward: CodecSpec[];
}

export interface CodecChoice {
  forward: CodecSpec;
  backward: CodecSpec;
}

/** v1.1: one privacy defense of a session (see proto/handshake.proto). */
export interface Defense {
  name: string;
  scale: number;
  clip: number;
  noiseStd: number;
}

/** The defense names this build knows; a Hello naming another is refused. */
export const DEFENSE_NAMES = ['noise', 'deeper-bottom', 'max-norm', 'gradient-noise', 'nopeek', 'marvell'] as const;

export interface Hello {
  versions: VersionRange;
  clientBuild: string;
  model: ModelRef;
  codecs: CodecOffer;
  limits: Limits;
  cut: Cut;
  training: TrainingSpec;
  allowNonFinite: boolean;
  /** v1.1; absent (never an empty list) when the edge offers none. */
  defenses?: Defense[];
}

export interface Welcome {
  version: ProtocolVersion;
  serverBuild: string;
  sessionId: string;
  model: ModelRef;
  codecs: CodecChoice;
  limits: Limits;
  cut: Cut;
  training: TrainingSpec;
  allowNonFinite: boolean;
  /** v1.1; absent when the session has none. */
  defenses?: Defense[];
}

export interface SessionOpen {
  sessionId: string;
  resumeStep: number;
}

export type CloseReason = 'unspecified' | 'completed' | 'cancelled' | 'failed' | 'expired';

export interface SessionClose {
  sessionId: string;
  reason: CloseReason;
  message: string;
}

export interface Heartbeat {
  sessionId: string;
  sequence: number;
  sentAtMs: number;
}

interface StepMessage {
  sessionId: string;
  step: number;
  microbatch: number;
  frames: TensorFrame[];
}

export interface Forward extends StepMessage {
  needsBackward: boolean;
}

export type ForwardResult = StepMessage;

export interface Backward extends StepMessage {
  /** v1.2: this micro-batch's share of the step's training loss, for the tenant's dashboard; absent when not reported (0 on the wire). */
  loss?: number;
}

export interface BackwardResult extends StepMessage {
  recomputed: boolean;
}

/** v1.3: the edge's optimizer step for the middle adapter the cloud holds. */
export interface StepCommit {
  sessionId: string;
  step: number;
  lr: number;
  /** 0: no clipping. */
  maxGradNorm: number;
  edgeGradSquareSum: number;
  microbatches: number;
  exportAdapter: boolean;
}

export interface StepCommitted {
  sessionId: string;
  step: number;
  middleGradSquareSum: number;
  /** With exportAdapter: the middle adapter's tensors, named by PEFT key. */
  frames: TensorFrame[];
}

/** The Error body: a code from some errors.ts catalogue, a message, details as strings. */
export interface ErrorBody {
  code: string;
  message: string;
  details: Record<string, string>;
}

export interface Chunk {
  streamId: string;
  index: number;
  count: number;
  totalBytes: number;
  crc32: number;
  data: Uint8Array;
}

/** Split inference (1.2): h_B of new tokens at `position`; 0 starts a new sequence. */
export interface InferStep {
  sessionId: string;
  position: number;
  frames: TensorFrame[];
}

/** h_M of the new tokens of an InferStep. */
export type InferStepResult = InferStep;

/** Frees the middle's KV cache of the session. */
export interface InferEnd {
  sessionId: string;
}

export type Body =
  | { case: 'hello'; value: Hello }
  | { case: 'welcome'; value: Welcome }
  | { case: 'sessionOpen'; value: SessionOpen }
  | { case: 'sessionClose'; value: SessionClose }
  | { case: 'forward'; value: Forward }
  | { case: 'forwardResult'; value: ForwardResult }
  | { case: 'backward'; value: Backward }
  | { case: 'backwardResult'; value: BackwardResult }
  | { case: 'heartbeat'; value: Heartbeat }
  | { case: 'error'; value: ErrorBody }
  | { case: 'chunk'; value: Chunk }
  | { case: 'stepCommit'; value: StepCommit }
  | { case: 'stepCommitted'; value: StepCommitted }
  | { case: 'inferStep'; value: InferStep }
  | { case: 'inferStepResult'; value: InferStepResult }
  | { case: 'inferEnd'; value: InferEnd };

export type BodyCase = Body['case'];

export interface Envelope {
  version: ProtocolVersion;
  requestId: string;
  body: Body;
}
