// A request may carry the edge's frame of h or g in place of the float32 values: the worker
// decodes it into exactly the values the gateway decoded, the body is smaller by the codec's
// ratio, and a frame that is not the request's shape, is corrupt, or is not bytes is refused
// by name before anything computes.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { WAIT_HEADER, decodeReply, decodeRequest, encodeReply, encodeRequest, waitOf } from '../../cloud-node/cluster/wire.ts';
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

describe("a held adapter's factors and their gradients", () => {
  const lora = { scale: 2, modules: [{ path: 'model.layers.2.self_attn.q_proj', r: 2, inFeatures: 64, outFeatures: 64, a: values.slice(0, 128), b: values.slice(128, 256) }] };

  it('cross as they were sent; a forward with them keeps no tape; factors unlike their shape or over the limit are refused', () => {
    const request: MiddleRequest = { op: 'backward', blocks, shape, h: values, g: values, lora };
    assert.deepStrictEqual(decodeRequest(encodeRequest(request), 1 << 16), request);
    assert.throws(() => decodeRequest(encodeRequest({ op: 'forward', blocks, shape, h: values, keepTape: true, lora }), 1 << 16), { code: 'TANDEM_CLUSTER_MESSAGE_INVALID', message: /keepTape/ });
    const short = { ...lora, modules: [{ ...lora.modules[0], a: values.slice(0, 127) }] };
    assert.throws(() => decodeRequest(encodeRequest({ ...request, lora: short }), 1 << 16), { message: /lora\.modules\[0\]\.a .*holds 508 bytes; the shape needs 512/ });
    // h and g hold 2048 values each; the factors are bounded by the same limit.
    const wide = { ...lora, modules: [{ ...lora.modules[0], r: 40, a: new Float32Array(40 * 64), b: new Float32Array(64 * 40) }] };
    assert.throws(() => decodeRequest(encodeRequest({ ...request, lora: wide }), 4096), { message: /lora .*more than 4096 values/ });
    assert.throws(() => decodeRequest(encodeRequest({ ...request, lora: { scale: 2, modules: [] } }), 1 << 16), { message: /names no module/ });
  });

  it("a backward's reply answers one gradient per factor, of its length; another count or length is refused", () => {
    const loraGrads = [values.slice(0, 128), values.slice(128, 256)];
    const reply = { ok: true as const, worker: 'w', output: values, computeMs: 1, loraGrads };
    const decoded = decodeReply(encodeReply(reply), values.length, [128, 128]);
    assert.ok(decoded.ok);
    assert.deepStrictEqual(decoded.loraGrads, loraGrads);
    assert.throws(() => decodeReply(encodeReply(reply), values.length, [128]), { message: /loraGrads .*list of 1 tensors/ });
    assert.throws(() => decodeReply(encodeReply(reply), values.length, [128, 129]), { message: /loraGrads\[1\] .*holds 512 bytes; the shape needs 516/ });
    assert.throws(() => decodeReply(encodeReply({ ...reply, loraGrads: undefined }), values.length, [128, 128]), { message: /loraGrads/ });
  });
});
