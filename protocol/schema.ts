// The protobufjs reflection types, built once from the embedded .proto sources.
import protobuf from 'protobufjs';
import { PROTO_SOURCES } from './schema.generated.ts';

/** Parses .proto sources (file name -> text) into one resolved root. Exported for tests that model other versions. */
export function buildSchemaRoot(sources: Readonly<Record<string, string>>): protobuf.Root {
  const root = new protobuf.Root();
  for (const name of Object.keys(sources).sort()) {
    // Imports name files of this same set, so they are already (or will be) parsed into the root.
    protobuf.parse(sources[name], root, { keepCase: false });
  }
  root.resolveAll();
  return root;
}

const root = buildSchemaRoot(PROTO_SOURCES);

export const wireTypes = {
  Envelope: root.lookupType('tandem.Envelope'),
  EnvelopeHeader: root.lookupType('tandem.EnvelopeHeader'),
  TensorFrame: root.lookupType('tandem.TensorFrame'),
  Chunk: root.lookupType('tandem.Chunk'),
} as const;
