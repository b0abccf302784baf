// Protocol versions and their negotiation. The rules are in protocol/README.md.
import { ProtocolError } from './errors.ts';
import type { ProtocolVersion, VersionRange } from './messages.ts';

/** The version this build writes. */
export const PROTOCOL_VERSION: ProtocolVersion = Object.freeze({ major: 1, minor: 3 });

/** Every version this build reads and writes: 1.1 adds the session's privacy defenses to Hello and Welcome; 1.2 adds the marvell defense, the edge's loss in Backward and split inference (InferStep, InferStepResult, InferEnd); 1.3 adds the middle adapter the cloud holds (TrainingSpec.middle_adapter, StepCommit, StepCommitted); protocol/README.md lists them. */
export const SUPPORTED_VERSIONS: VersionRange = Object.freeze({ min: Object.freeze({ major: 1, minor: 0 }), max: PROTOCOL_VERSION });

export function compareVersions(a: ProtocolVersion, b: ProtocolVersion): number {
  return a.major !== b.major ? a.major - b.major : a.minor - b.minor;
}

export function formatVersion(v: ProtocolVersion): string {
  return `${v.major}.${v.minor}`;
}

export function formatRange(r: VersionRange): string {
  return `[${formatVersion(r.min)}, ${formatVersion(r.max)}]`;
}

/** True when this build can read a message written at `version`: same major, any minor (minors only add fields). */
export function isReadableVersion(version: ProtocolVersion, ours: VersionRange = SUPPORTED_VERSIONS): boolean {
  return version.major >= ours.min.major && version.major <= ours.max.major;
}

/** The highest version in both ranges; a typed error naming both ranges when they do not overlap. */
export function negotiateVersion(theirs: VersionRange, ours: VersionRange = SUPPORTED_VERSIONS): ProtocolVersion {
  if (compareVersions(theirs.min, theirs.max) > 0) {
    throw new ProtocolError('TANDEM_PROTO_FIELD_INVALID', { field: 'hello.versions', reason: `min ${formatVersion(theirs.min)} is above max ${formatVersion(theirs.max)}` });
  }
  const low = compareVersions(theirs.min, ours.min) > 0 ? theirs.min : ours.min;
  const high = compareVersions(theirs.max, ours.max) < 0 ? theirs.max : ours.max;
  if (compareVersions(low, high) > 0) {
    throw new ProtocolError('TANDEM_PROTO_VERSION_UNSUPPORTED', { ours: formatRange(ours), theirs: formatRange(theirs) });
  }
  return { major: high.major, minor: high.minor };
}
