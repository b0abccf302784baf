// The public surface of protocol/. Other folders import from here and nowhere else.
export { PROTOCOL_ERRORS, ProtocolError, isProtocolErrorCode } from './errors.ts';
export type { ProtocolErrorCode, ProtocolErrorDetails } from './errors.ts';
export type {
  Backward, BackwardResult, Body, BodyCase, Chunk, CloseReason, CodecChoice, CodecName, CodecOffer, CodecParams, CodecSpec, Cut,
  Defense, DTypeName, Envelope, ErrorBody, Forward, ForwardResult, Heartbeat, Hello, InferEnd, InferStep, InferStepResult, Limits, ModelRef, ProtocolVersion, SessionClose,
  SessionOpen, TensorFrame, TopkValuesCodec, TrainingSpec, VersionRange, Welcome, MiddleAdapterMethod, MiddleAdapterSpec, StepCommit, StepCommitted,
} from './messages.ts';
export { DEFENSE_NAMES, MIDDLE_ADAPTER_METHODS } from './messages.ts';
export { MAX_DEFENSES, MIDDLE_ADAPTER_LIMITS } from './wire.ts';
export {
  PROTOCOL_VERSION, SUPPORTED_VERSIONS, compareVersions, formatRange, formatVersion, isReadableVersion, negotiateVersion,
} from './version.ts';
export { DEFAULT_LIMITS, LIMIT_FLOORS, checkLimitFloors, intersectLimits } from './limits.ts';
export { decodeEnvelope, encodeEnvelope, envelope, errorBody } from './envelope.ts';
export { MAX_DECODED_VALUES, checkDecodedValues } from './wire-scan.ts';
export type { DecodeEnvelopeOptions } from './envelope.ts';
export { negotiateCodecs } from './codec-negotiation.ts';
export type { CodecPreferences } from './codec-negotiation.ts';
export { decodeTensor, encodeTensor, frameBytes, frameChecksum, validateFrame } from './tensor-frame.ts';
export { decodeFrame, encodeFrame } from './frame-bytes.ts';
export type { EncodeTensorOptions, FrameExpectation } from './tensor-frame.ts';
export { CODEC_NAMES } from './codecs/registry.ts';
export { DEFAULT_BLOCK_SIZE } from './codecs/codec.ts';
export { DEFAULT_TOPK_FRACTION } from './codecs/topk.ts';
export { DEFAULT_FEEDBACK_BYTES, ErrorFeedback, FeedbackLedger } from './error-feedback.ts';
export type { ErrorFeedbackOptions } from './error-feedback.ts';
export { CRC32_IMPLEMENTATION, crc32, crc32Js } from './crc32.ts';
export { messagesForTransport, splitMessage } from './chunker.ts';
export { HELD_CHUNK_OVERHEAD_BYTES, MAX_STREAM_ID_CHARS, ReassemblyBudget, Reassembler } from './reassembler.ts';
export type { ReassemblerOptions } from './reassembler.ts';
export { AUTH_ERROR_CODES, DEFAULT_CUT, EDGE_WEIGHTS_FILE, WIRE_ERRORS, replyStreamId } from './contract.ts';
export type { WireErrorCode } from './contract.ts';
export type { AdapterEvaluation, CutLimits, EdgeManifest, FileEntry, LmFigures, ModelDescription, PlugInEvaluation } from './rest.ts';
export { DEFAULT_OWNER_TIMEOUT_SECONDS, FEDERATION_AGGREGATIONS, FEDERATION_MODES, MAX_LOCAL_STEPS, MAX_ROUND_DEADLINE_SECONDS, SECAGG_PHASES, decodeFloat32, decodeUint32, encodeFloat32, encodeUint32 } from './federation.ts';
export type { FederationAggregation, FederationCreate, FederationDp, FederationMode, FederationStatus, RoundAlive, RoundAssignment, RoundRecord, RoundUpdate, RoundUpdateAck, SecAggKeys, SecAggPhase, SecAggReveal, SecAggShares, SecAggView, WireAdapter, WireShare, WireTensor } from './federation.ts';
