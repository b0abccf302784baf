// One way to send a file of a listed set (the edge part, an emulator bundle): the bytes as
// application/octet-stream with their sha256 in x-tandem-sha256, or the set's own 404.
import type { FastifyReply } from 'fastify';
import type { CloudError } from '../errors.ts';

export interface ListedFile {
  name: string;
  bytes: number;
  sha256: string;
}

export interface FileSet {
  files: readonly ListedFile[];
  contents: ReadonlyMap<string, Uint8Array>;
}

/** Sends `name` from `set`; `unknown(name, listing)` builds the error for a name the set lacks. */
export function sendListedFile(reply: FastifyReply, set: FileSet, name: string, unknown: (name: string, listing: string) => CloudError): FastifyReply {
  const bytes = set.contents.get(name);
  const file = set.files.find((f) => f.name === name);
  if (bytes === undefined || file === undefined) throw unknown(JSON.stringify(name), set.files.map((f) => f.name).join(', '));
  return reply.type('application/octet-stream').header('x-tandem-sha256', file.sha256).send(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
}
