// A request body held to a limit known only once the request is seen (fastify's bodyLimit is
// one figure a route): refused by its declared length before a byte is read, and as soon as
// its bytes pass the limit when it declares none or lies.
import { Transform } from 'node:stream';
import type { FastifyRequest } from 'fastify';

/** 413, TANDEM_REQUEST_INVALID (node.ts's error handler), as fastify's own body limit answers. */
export function tooLarge(what: string, limit: number): Error {
  return Object.assign(new Error(`${what} holds more than ${limit} bytes, the limit`), { statusCode: 413 });
}

/** For a preParsing hook: `payload`, refused past `limit` bytes. */
export function boundedBody(request: FastifyRequest, payload: NodeJS.ReadableStream, limit: number, what: string): NodeJS.ReadableStream {
  const declared = Number(request.headers['content-length']);
  if (declared > limit) throw tooLarge(what, limit);
  let bytes = 0;
  const counted = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      bytes += chunk.length;
      done(bytes > limit ? tooLarge(what, limit) : null, chunk);
    },
  });
  payload.on('error', (error) => counted.destroy(error));
  return payload.pipe(counted);
}
