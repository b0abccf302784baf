// Converts between the TypeScript messages and the plain objects protobufjs encodes and
// decodes. Decoded bytes stay views into the received buffer: nothing is copied here.
import { ProtocolError } from './errors.ts';
import { DEFENSE_NAMES, MIDDLE_ADAPTER_METHODS } from './messages.ts';
import type {
  Body, CloseReason, MiddleAdapterMethod, MiddleAdapterSpec, CodecName, CodecParams, CodecSpec, Cut, Defense, DTypeName, Envelope, Limits, ModelRef,
  ProtocolVersion, TensorFrame, TopkValuesCodec, TrainingSpec, VersionRange,
} from './messages.ts';

type Wire = Record<string, unknown>;

export const CODEC_WIRE: Readonly<Record<CodecName, number>> = {
  f32: 1, f16: 2, bf16: 3, 'int8-block': 4, 'int4-block': 5, topk: 6,
};
const CODEC_BY_WIRE: ReadonlyMap<number, CodecName> = new Map(Object.entries(CODEC_WIRE).map(([name, n]) => [n, name as CodecName]));

export const DTYPE_WIRE: Readonly<Record<DTypeName, number>> = { f32: 1, f16: 2, bf16: 3 };
const DTYPE_BY_WIRE: ReadonlyMap<number, DTypeName> = new Map(Object.entries(DTYPE_WIRE).map(([name, n]) => [n, name as DTypeName]));

const CLOSE_REASONS: readonly CloseReason[] = ['unspecified', 'completed', 'cancelled', 'failed', 'expired'];

const EMPTY_BYTES = new Uint8Array(0);

const str = (m: Wire, key: string): string => (typeof m[key] === 'string' ? (m[key] as string) : '');
const num = (m: Wire, key: string): number => (typeof m[key] === 'number' ? (m[key] as number) : 0);
const bool = (m: Wire, key: string): boolean => m[key] === true;
// protobufjs gives an empty array, not an empty Uint8Array, for an absent bytes field.
const bytes = (m: Wire, key: string): Uint8Array => (m[key] instanceof Uint8Array ? (m[key] as Uint8Array) : EMPTY_BYTES);
const sub = (m: Wire, key: string): Wire => (m[key] !== null && typeof m[key] === 'object' ? (m[key] as Wire) : {});
const list = (m: Wire, key: string): Wire[] => (Array.isArray(m[key]) ? (m[key] as Wire[]) : []);

export function codecName(wire: number, field: string): CodecName {
  const name = CODEC_BY_WIRE.get(wire);
  if (name === undefined) throw new ProtocolError('TANDEM_PROTO_CODEC_UNSUPPORTED', { codec: wire, field });
  return name;
}

function topkValues(wire: number, field: string): TopkValuesCodec | null {
  if (wire === 0) return null;
  const name = codecName(wire, field);
  if (name !== 'f16' && name !== 'int8-block') {
    throw new ProtocolError('TANDEM_PROTO_CODEC_PARAMS_INVALID', { field, reason: `top-k values cannot use ${name}` });
  }
  return name;
}

const versionFromWire = (m: Wire): ProtocolVersion => ({ major: num(m, 'major'), minor: num(m, 'minor') });
const rangeFromWire = (m: Wire): VersionRange => ({ min: versionFromWire(sub(m, 'min')), max: versionFromWire(sub(m, 'max')) });
const modelFromWire = (m: Wire): ModelRef => ({ id: str(m, 'id'), contentHash: str(m, 'contentHash') });
const cutFromWire = (m: Wire): Cut => ({ bottom: num(m, 'bottom'), top: num(m, 'top') });
const limitsFromWire = (m: Wire): Limits => ({
  maxFrameBytes: num(m, 'maxFrameBytes'),
  maxMessageBytes: num(m, 'maxMessageBytes'),
  maxRank: num(m, 'maxRank'),
  maxDim: num(m, 'maxDim'),
  maxElements: num(m, 'maxElements'),
});
/** The most defenses one Hello or Welcome may carry. */
export const MAX_DEFENSES = 16;

/** v1.1 defenses: known names only, each once, parameters finite and ≥ 0; absent when the list is empty. */
function defensesFromWire(items: Wire[], field: string): { defenses?: Defense[] } {
  if (items.length === 0) return {};
  if (items.length > MAX_DEFENSES) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field, reason: `${items.length} defenses, over the limit of ${MAX_DEFENSES}` });
  const seen = new Set<string>();
  const defenses = items.map((m, i): Defense => {
    const d = { name: str(m, 'name'), scale: num(m, 'scale'), clip: num(m, 'clip'), noiseStd: num(m, 'noiseStd') };
    if (!(DEFENSE_NAMES as readonly string[]).includes(d.name)) {
      throw new ProtocolError('TANDEM_PROTO_DEFENSE_UNKNOWN', { name: JSON.stringify(d.name.slice(0, 40)), field: `${field}[${i}].name`, known: DEFENSE_NAMES.join(', ') });
    }
    if (seen.has(d.name)) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: `${field}[${i}].name`, reason: `${d.name} is given twice` });
    seen.add(d.name);
    for (const k of ['scale', 'clip', 'noiseStd'] as const) {
      if (!Number.isFinite(d[k]) || d[k] < 0) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: `${field}[${i}].${k}`, reason: 'must be a finite number ≥ 0' });
    }
    return d;
  });
  return { defenses };
}

/** Bounds of a v1.3 middle adapter that any build refuses past (a node's quotas may be lower). */
export const MIDDLE_ADAPTER_LIMITS = { rank: 256, targets: 16, targetLength: 64 } as const;

function middleAdapterFromWire(m: Wire, field: string): MiddleAdapterSpec {
  const method = str(m, 'method');
  if (!(MIDDLE_ADAPTER_METHODS as readonly string[]).includes(method)) {
    throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_METHOD_UNKNOWN', { method: JSON.stringify(method.slice(0, 40)), field: `${field}.method`, known: MIDDLE_ADAPTER_METHODS.join(', ') });
  }
  const targets = (Array.isArray(m.targets) ? m.targets : []).filter((x): x is string => typeof x === 'string');
  const spec: MiddleAdapterSpec = {
    method: method as MiddleAdapterMethod, rank: num(m, 'rank'), alpha: num(m, 'alpha'), targets, seed: num(m, 'seed'), methodIndex: num(m, 'methodIndex'),
    beta1: num(m, 'beta1'), beta2: num(m, 'beta2'), eps: num(m, 'eps'), weightDecay: num(m, 'weightDecay'),
  };
  if (targets.length > MIDDLE_ADAPTER_LIMITS.targets) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_LIMIT_EXCEEDED', { field: `${field}.targets`, actual: `${targets.length} entries`, limit: `${MIDDLE_ADAPTER_LIMITS.targets} entries` });
  if (targets.length === 0) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.targets`, reason: 'names no module' });
  targets.forEach((t, i) => {
    if (t.length === 0 || t.length > MIDDLE_ADAPTER_LIMITS.targetLength || !/^[A-Za-z0-9_.]+$/.test(t)) {
      throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.targets[${i}]`, reason: `a module name of 1 to ${MIDDLE_ADAPTER_LIMITS.targetLength} letters, digits, _ or .` });
    }
  });
  if (spec.method === 'lora') {
    if (spec.rank < 1) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.rank`, reason: 'LoRA needs a rank >= 1' });
    if (spec.rank > MIDDLE_ADAPTER_LIMITS.rank) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_LIMIT_EXCEEDED', { field: `${field}.rank`, actual: spec.rank, limit: MIDDLE_ADAPTER_LIMITS.rank });
    if (!(spec.alpha > 0) || !Number.isFinite(spec.alpha)) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.alpha`, reason: 'must be a finite number > 0' });
  }
  for (const k of ['beta1', 'beta2'] as const) {
    if (!(spec[k] >= 0 && spec[k] < 1)) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.${k}`, reason: 'must be in [0, 1)' });
  }
  for (const k of ['eps', 'weightDecay'] as const) {
    if (!(spec[k] >= 0) || !Number.isFinite(spec[k])) throw new ProtocolError('TANDEM_PROTO_MIDDLE_ADAPTER_INVALID', { field: `${field}.${k}`, reason: 'must be a finite number >= 0' });
  }
  return spec;
}

const trainingFromWire = (m: Wire, field: string): TrainingSpec => ({
  methods: (Array.isArray(m.methods) ? m.methods : []).filter((x): x is string => typeof x === 'string'),
  cloudMiddleLora: bool(m, 'cloudMiddleLora'),
  middleLoraRank: num(m, 'middleLoraRank'),
  ...(m.middleAdapter !== null && typeof m.middleAdapter === 'object' ? { middleAdapter: middleAdapterFromWire(sub(m, 'middleAdapter'), `${field}.middle_adapter`) } : {}),
});

/** Null when the peer offers a codec this build does not know: newer peers may offer more. */
function codecSpecFromWire(m: Wire): CodecSpec | null {
  const codec = CODEC_BY_WIRE.get(num(m, 'codec'));
  if (codec === undefined) return null;
  const spec: CodecSpec = { codec };
  if (num(m, 'blockSize') !== 0) spec.blockSize = num(m, 'blockSize');
  if (num(m, 'topkFraction') !== 0) spec.topkFraction = num(m, 'topkFraction');
  const values = num(m, 'topkValues');
  if (values === CODEC_WIRE.f16) spec.topkValues = 'f16';
  else if (values === CODEC_WIRE['int8-block']) spec.topkValues = 'int8-block';
  return spec;
}

function codecSpecsFromWire(items: Wire[]): CodecSpec[] {
  return items.map(codecSpecFromWire).filter((spec): spec is CodecSpec => spec !== null);
}

function chosenSpecFromWire(m: Wire, field: string): CodecSpec {
  const spec = codecSpecFromWire(m);
  if (spec === null) throw new ProtocolError('TANDEM_PROTO_CODEC_UNSUPPORTED', { codec: num(m, 'codec'), field });
  return spec;
}

function paramsFromWire(m: Wire, field: string): CodecParams {
  return {
    blockSize: num(m, 'blockSize'),
    scales: bytes(m, 'scales'),
    k: num(m, 'k'),
    topkValues: topkValues(num(m, 'topkValues'), `${field}.params.topk_values`),
    indices: bytes(m, 'indices'),
  };
}

export function frameFromWire(m: Wire, field = 'frame'): TensorFrame {
  const dtype = DTYPE_BY_WIRE.get(num(m, 'dtype'));
  if (dtype === undefined) throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: `${field}.dtype`, reason: `unknown dtype ${num(m, 'dtype')}` });
  return {
    name: str(m, 'name'),
    dtype,
    shape: Array.isArray(m.shape) ? (m.shape as number[]) : [],
    codec: codecName(num(m, 'codec'), `${field}.codec`),
    params: paramsFromWire(sub(m, 'params'), field),
    payload: bytes(m, 'payload'),
    crc32: num(m, 'crc32'),
  };
}

function stepFromWire(m: Wire, field: string) {
  return {
    sessionId: str(m, 'sessionId'),
    step: num(m, 'step'),
    microbatch: num(m, 'microbatch'),
    frames: list(m, 'frames').map((frame, i) => frameFromWire(frame, `${field}.frames[${i}]`)),
  };
}

function bodyFromWire(m: Wire): Body {
  const which = m.body;
  const b = typeof which === 'string' ? sub(m, which) : {};
  switch (which) {
    case 'hello': {
      const codecs = sub(b, 'codecs');
      return {
        case: 'hello',
        value: {
          versions: rangeFromWire(sub(b, 'versions')),
          clientBuild: str(b, 'clientBuild'),
          model: modelFromWire(sub(b, 'model')),
          codecs: { forward: codecSpecsFromWire(list(codecs, 'forward')), backward: codecSpecsFromWire(list(codecs, 'backward')) },
          limits: limitsFromWire(sub(b, 'limits')),
          cut: cutFromWire(sub(b, 'cut')),
          training: trainingFromWire(sub(b, 'training'), 'hello.training'),
          allowNonFinite: bool(b, 'allowNonFinite'),
          ...defensesFromWire(list(b, 'defenses'), 'hello.defenses'),
        },
      };
    }
    case 'welcome': {
      const codecs = sub(b, 'codecs');
      return {
        case: 'welcome',
        value: {
          version: versionFromWire(sub(b, 'version')),
          serverBuild: str(b, 'serverBuild'),
          sessionId: str(b, 'sessionId'),
          model: modelFromWire(sub(b, 'model')),
          codecs: {
            forward: chosenSpecFromWire(sub(codecs, 'forward'), 'welcome.codecs.forward'),
            backward: chosenSpecFromWire(sub(codecs, 'backward'), 'welcome.codecs.backward'),
          },
          limits: limitsFromWire(sub(b, 'limits')),
          cut: cutFromWire(sub(b, 'cut')),
          training: trainingFromWire(sub(b, 'training'), 'welcome.training'),
          allowNonFinite: bool(b, 'allowNonFinite'),
          ...defensesFromWire(list(b, 'defenses'), 'welcome.defenses'),
        },
      };
    }
    case 'sessionOpen':
      return { case: 'sessionOpen', value: { sessionId: str(b, 'sessionId'), resumeStep: num(b, 'resumeStep') } };
    case 'sessionClose':
      return {
        case: 'sessionClose',
        // A reason added by a later minor version reads as 'unspecified'.
        value: { sessionId: str(b, 'sessionId'), reason: CLOSE_REASONS[num(b, 'reason')] ?? 'unspecified', message: str(b, 'message') },
      };
    case 'forward':
      return { case: 'forward', value: { ...stepFromWire(b, 'forward'), needsBackward: bool(b, 'needsBackward') } };
    case 'forwardResult':
      return { case: 'forwardResult', value: stepFromWire(b, 'forwardResult') };
    case 'backward':
      return { case: 'backward', value: { ...stepFromWire(b, 'backward'), ...(num(b, 'loss') !== 0 ? { loss: num(b, 'loss') } : {}) } };
    case 'backwardResult':
      return { case: 'backwardResult', value: { ...stepFromWire(b, 'backwardResult'), recomputed: bool(b, 'recomputed') } };
    case 'heartbeat':
      return { case: 'heartbeat', value: { sessionId: str(b, 'sessionId'), sequence: num(b, 'sequence'), sentAtMs: num(b, 'sentAtMs') } };
    case 'error': {
      const details: Record<string, string> = {};
      const wireDetails = sub(b, 'details');
      for (const key of Object.keys(wireDetails)) details[key] = String(wireDetails[key]);
      return { case: 'error', value: { code: str(b, 'code'), message: str(b, 'message'), details } };
    }
    case 'chunk':
      return {
        case: 'chunk',
        value: {
          streamId: str(b, 'streamId'),
          index: num(b, 'index'),
          count: num(b, 'count'),
          totalBytes: num(b, 'totalBytes'),
          crc32: num(b, 'crc32'),
          data: bytes(b, 'data'),
        },
      };
    case 'inferStep':
    case 'inferStepResult':
      return {
        case: which,
        value: { sessionId: str(b, 'sessionId'), position: num(b, 'position'), frames: list(b, 'frames').map((frame, i) => frameFromWire(frame, `${which}.frames[${i}]`)) },
      };
    case 'inferEnd':
      return { case: 'inferEnd', value: { sessionId: str(b, 'sessionId') } };
    case 'stepCommit':
      return {
        case: 'stepCommit',
        value: {
          sessionId: str(b, 'sessionId'), step: num(b, 'step'), lr: num(b, 'lr'), maxGradNorm: num(b, 'maxGradNorm'),
          edgeGradSquareSum: num(b, 'edgeGradSquareSum'), microbatches: num(b, 'microbatches'), exportAdapter: bool(b, 'exportAdapter'),
        },
      };
    case 'stepCommitted':
      return {
        case: 'stepCommitted',
        value: {
          sessionId: str(b, 'sessionId'), step: num(b, 'step'), middleGradSquareSum: num(b, 'middleGradSquareSum'),
          frames: list(b, 'frames').map((frame, i) => frameFromWire(frame, `stepCommitted.frames[${i}]`)),
        },
      };
    default:
      throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'envelope.body', reason: 'no body, or a body this version does not know' });
  }
}

export function envelopeFromWire(m: Wire): Envelope {
  return { version: versionFromWire(sub(m, 'version')), requestId: str(m, 'requestId'), body: bodyFromWire(m) };
}

function codecSpecToWire(spec: CodecSpec): Wire {
  return {
    codec: CODEC_WIRE[spec.codec],
    blockSize: spec.blockSize ?? 0,
    topkFraction: spec.topkFraction ?? 0,
    topkValues: spec.topkValues === undefined ? 0 : CODEC_WIRE[spec.topkValues],
  };
}

export function frameToWire(frame: TensorFrame): Wire {
  const p = frame.params;
  return {
    name: frame.name,
    dtype: DTYPE_WIRE[frame.dtype],
    shape: frame.shape,
    codec: CODEC_WIRE[frame.codec],
    params: { blockSize: p.blockSize, scales: p.scales, k: p.k, topkValues: p.topkValues === null ? 0 : CODEC_WIRE[p.topkValues], indices: p.indices },
    payload: frame.payload,
    crc32: frame.crc32,
  };
}

function bodyToWire(body: Body): Wire {
  switch (body.case) {
    case 'hello': {
      const v = body.value;
      return {
        ...v,
        codecs: { forward: v.codecs.forward.map(codecSpecToWire), backward: v.codecs.backward.map(codecSpecToWire) },
      };
    }
    case 'welcome': {
      const v = body.value;
      return { ...v, codecs: { forward: codecSpecToWire(v.codecs.forward), backward: codecSpecToWire(v.codecs.backward) } };
    }
    case 'sessionClose':
      return { ...body.value, reason: CLOSE_REASONS.indexOf(body.value.reason) };
    case 'forward':
    case 'forwardResult':
    case 'backward':
    case 'backwardResult':
    case 'inferStep':
    case 'inferStepResult':
    case 'stepCommitted':
      return { ...body.value, frames: body.value.frames.map(frameToWire) };
    case 'error':
    case 'sessionOpen':
    case 'heartbeat':
    case 'chunk':
    case 'inferEnd':
    case 'stepCommit':
      return { ...body.value };
  }
}

export function envelopeToWire(envelope: Envelope): Wire {
  return { version: envelope.version, requestId: envelope.requestId, [envelope.body.case]: bodyToWire(envelope.body) };
}
