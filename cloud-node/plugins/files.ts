// One way to send a file of a listed set (the edge part, an emulator bundle): the bytes as
// application/octet-stream with their sha256 in x-tandem-sha256, or the set's own 404.
import { Readable } from 'node:stream';
import type { FastifyReply } from 'fastify';
import type { CloudError } from '../errors.ts';

export interface ListedFile {
  name: string;
  bytes: number;
  sha256: string;
}

export interface FileSet {
  files: readonly ListedFile[];
  /** A file's bytes, or the pieces it is sent in, in order. */
  contents: ReadonlyMap<string, Uint8Array | readonly Uint8Array[]>;
}

/** Sends `name` from `set`; `unknown(name, listing)` builds the error for a name the set lacks. */
export function sendListedFile(reply: FastifyReply, set: FileSet, name: string, unknown: (name: string, listing: string) => CloudError): FastifyReply {
  const bytes = set.contents.get(name);
  const file = set.files.find((f) => f.name === name);
  if (bytes === undefined || file === undefined) throw unknown(JSON.stringify(name), set.files.map((f) => f.name).join(', '));
  reply.type('application/octet-stream').header('x-tandem-sha256', file.sha256);
  if (bytes instanceof Uint8Array) return reply.send(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  const pieces = bytes.map((b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength));
  return reply.header('content-length', file.bytes).send(Readable.from(pieces, { objectMode: false }));
}
