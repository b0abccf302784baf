// Envelopes to bytes and back. Decoding takes untrusted bytes and throws nothing but
// ProtocolError; tensor payloads stay views into the given bytes.
import { asProtocolError, ProtocolError } from './errors.ts';
import { DEFAULT_LIMITS } from './limits.ts';
import type { Body, Envelope, ErrorBody, VersionRange } from './messages.ts';
import { wireTypes } from './schema.ts';
import { checkDecodedValues } from './wire-scan.ts';
import { PROTOCOL_VERSION, SUPPORTED_VERSIONS, compareVersions, formatRange, formatVersion, isReadableVersion } from './version.ts';
import { envelopeFromWire, envelopeToWire } from './wire.ts';

export interface DecodeEnvelopeOptions {
  /** Bytes beyond limits.maxMessageBytes are refused before parsing. */
  maxMessageBytes?: number;
  /** The versions this side reads; SUPPORTED_VERSIONS by default. */
  supported?: VersionRange;
}

/** An envelope at this build's version. */
export function envelope(requestId: string, body: Body): Envelope {
  return { version: { ...PROTOCOL_VERSION }, requestId, body };
}

export function encodeEnvelope(value: Envelope): Uint8Array {
  try {
    const bytes = wireTypes.Envelope.encode(envelopeToWire(value)).finish();
    // In Node protobufjs returns a Buffer; callers get the same plain Uint8Array everywhere (a view, not a copy).
    return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
  } catch (error) {
    throw asProtocolError(error, 'TANDEM_PROTO_INPUT_INVALID', { field: 'envelope' });
  }
}

type Decoded = Record<string, unknown>;

function decodeWire(type: typeof wireTypes.Envelope, bytes: Uint8Array): Decoded {
  try {
    return type.decode(bytes) as unknown as Decoded;
  } catch (error) {
    // protobufjs throws Error and RangeError on truncated or malformed input, and a deep
    // enough nesting of groups overflows the stack: all of it is one typed error.
    throw asProtocolError(error, 'TANDEM_PROTO_MESSAGE_MALFORMED');
  }
}

/**
 * Reads the version first, from fields frozen across majors, so that a peer of another major
 * version is refused by name rather than misparsed; then decodes the whole envelope.
 */
export function decodeEnvelope(bytes: Uint8Array, options: DecodeEnvelopeOptions = {}): Envelope {
  const limit = options.maxMessageBytes ?? DEFAULT_LIMITS.maxMessageBytes;
  if (bytes.length > limit) throw new ProtocolError('TANDEM_PROTO_MESSAGE_TOO_LARGE', { actual: bytes.length, limit });
  const ours = options.supported ?? SUPPORTED_VERSIONS;
  const header = decodeWire(wireTypes.EnvelopeHeader, bytes);
  const version = header.version as { major?: number; minor?: number } | null;
  if (version === null || version === undefined) throw new ProtocolError('TANDEM_PROTO_VERSION_MISSING');
  const theirs = { major: version.major ?? 0, minor: version.minor ?? 0 };
  if (!isReadableVersion(theirs, ours)) {
    const hello = header.hello as { versions?: { min?: { major?: number; minor?: number }; max?: { major?: number; minor?: number } } } | null;
    const range = hello?.versions;
    const theirRange = range
      ? formatRange({
        min: { major: range.min?.major ?? 0, minor: range.min?.minor ?? 0 },
        max: { major: range.max?.major ?? 0, minor: range.max?.minor ?? 0 },
      })
      : formatVersion(theirs);
    throw new ProtocolError('TANDEM_PROTO_VERSION_UNSUPPORTED', { ours: formatRange(ours), theirs: theirRange });
  }
  // What the bytes would decode into is counted before protobufjs builds any of it (the header
  // above reads two small fields and steps over the rest).
  checkDecodedValues(wireTypes.Envelope, bytes);
  const decoded = envelopeFromWireSafe(decodeWire(wireTypes.Envelope, bytes));
  if (decoded.body.case === 'hello' && compareVersions(decoded.body.value.versions.min, decoded.body.value.versions.max) > 0) {
    throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'hello.versions', reason: 'min is above max' });
  }
  return decoded;
}

function envelopeFromWireSafe(decoded: Decoded): Envelope {
  try {
    return envelopeFromWire(decoded);
  } catch (error) {
    throw asProtocolError(error, 'TANDEM_PROTO_MESSAGE_MALFORMED');
  }
}

/** The Error body that reports `error` to the peer. */
export function errorBody(error: ProtocolError): ErrorBody {
  const details: Record<string, string> = {};
  for (const [key, value] of Object.entries(error.details)) details[key] = String(value);
  // The wire's message keeps the code in front (`CODE (number): ...`), as every released version sent it.
  return { code: error.code, message: error.describe(), details };
}
