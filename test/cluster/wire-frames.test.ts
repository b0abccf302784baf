// A request may carry the edge's frame of h or g in place of the float32 values: the worker
// decodes it into exactly the values the gateway decoded, the body is smaller by the codec's
// ratio, and a frame that is not the request's shape, is corrupt, or is not bytes is refused
// by name before anything computes.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { WAIT_HEADER, decodeRequest, encodeRequest, waitOf } from '../../cloud-node/cluster/wire.ts';
import { headers as natsHeaders } from '@nats-io/transport-node';
import type { MiddleRequest } from '../../cloud-node/cluster/wire.ts';
import { decodeTensor, encodeFrame, encodeTensor } from '../../protocol/index.ts';
import type { Shape3 } from '../../cloud-node/middle-runner.ts';
import { Packr } from 'msgpackr';

const shape: Shape3 = [2, 16, 64];
const values = Float32Array.from({ length: 2 * 16 * 64 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 5)));
const blocks = { start: 1, end: 4 };

describe('cluster requests carrying the edge frames', () => {
  it('an int8-block h and an f16 g decode at the worker to the values the gateway decoded, in a smaller body', () => {
    const hFrame = encodeTensor(values, shape, { codec: 'int8-block' }, { name: 'h_B' });
    const gFrame = encodeTensor(values, shape, { codec: 'f16' }, { name: 'g_M' });
    const h = decodeTensor(hFrame);
    const g = decodeTensor(gFrame);
    const plain = encodeRequest({ op: 'backward', blocks, shape, h, g });
    const framed = encodeRequest({ op: 'backward', blocks, shape, h, g, hFrame, gFrame });
    assert.ok(framed.byteLength < 0.45 * plain.byteLength, `the framed body is ${framed.byteLength} bytes against ${plain.byteLength}`);
    const got = decodeRequest(framed, 1 << 20) as Extract<MiddleRequest, { op: 'backward' }>;
    assert.deepEqual(got.h, h);
    assert.deepEqual(got.g, g);
    const forward = decodeRequest(encodeRequest({ op: 'forward', blocks, shape, h, hFrame, keepTape: true }), 1 << 20) as Extract<MiddleRequest, { op: 'forward' }>;
    assert.deepEqual(forward.h, h);
    assert.equal(forward.keepTape, true);
    const fromTape = decodeRequest(encodeRequest({ op: 'backwardFromTape', tapeId: 3, shape, g, gFrame }), 1 << 20) as Extract<MiddleRequest, { op: 'backwardFromTape' }>;
    assert.deepEqual(fromTape.g, g);
  });

  it('a frame of another shape, with a bad checksum, over the limit or not bytes is refused by field', () => {
    const packr = new Packr({ useRecords: false });
    const refused = (body: Record<string, unknown>, field: RegExp, maxElements = 1 << 20): void => {
      assert.throws(() => decodeRequest(packr.pack(body), maxElements), (err: Error & { code?: string }) => err.code === 'TANDEM_CLUSTER_MESSAGE_INVALID' && field.test(err.message));
    };
    const other = encodeTensor(values, [4, 8, 64], { codec: 'int8-block' });
    refused({ op: 'forward', blocks, shape, hFrame: encodeFrame(other), keepTape: false }, /hFrame.*shape/);
    const frame = encodeTensor(values, shape, { codec: 'int8-block' });
    const corrupt = encodeFrame({ ...frame, payload: frame.payload.map((b, i) => (i === 7 ? b ^ 1 : b)) });
    refused({ op: 'forward', blocks, shape, hFrame: corrupt, keepTape: false }, /hFrame.*crc32/);
    refused({ op: 'forward', blocks, shape, hFrame: 'not bytes', keepTape: false }, /hFrame.*not bytes/);
    refused({ op: 'backwardFromTape', tapeId: 1, shape, gFrame: new Uint8Array([0xff, 0xff, 0xff]) }, /gFrame/);
    // The request's shape is bounded before its frame is looked at.
    refused({ op: 'forward', blocks, shape, hFrame: encodeFrame(frame), keepTape: false }, /shape/, 1000);
  });
});

describe('the wait a request states', () => {
  it('is taken as whole ms in (0, 10 min]; anything else states none', () => {
    const wait = (text: string): number | undefined => {
      const h = natsHeaders();
      h.set(WAIT_HEADER, text);
      return waitOf(h);
    };
    assert.equal(wait('25000'), 25_000);
    for (const bad of ['0', '-5', '1.5', '1e3', '600001', '99999999999', 'soon', '']) assert.equal(wait(bad), undefined, bad);
    assert.equal(waitOf(undefined), undefined);
  });
});
