// 20,000+ random, mutated and structurally hostile NATS bodies: decodeRequest and decodeReply
// only ever return a well-formed value or throw a ClusterError TANDEM_CLUSTER_MESSAGE_INVALID;
// memory stays within what the small limits allow (a hang would meet the test's timeout; the
// slowest decode is printed, not asserted: tests assert no durations).
import test from 'node:test';
import assert from 'node:assert/strict';
import { Packr } from 'msgpackr';
import { decodeReply, decodeRequest, encodeReply, encodeRequest } from '../../cloud-node/cluster/wire.ts';
import type { MiddleReply, MiddleRequest } from '../../cloud-node/cluster/wire.ts';
import { ClusterError } from '../../cloud-node/cluster/errors.ts';
import { decodeTensor, encodeFrame, encodeTensor, frameChecksum } from '../../protocol/index.ts';
import type { CodecName, TensorFrame } from '../../protocol/index.ts';
import type { Shape3 } from '../../cloud-node/middle-runner.ts';
import { activationLike, seededRandom } from '../fixtures/protocol/activations.ts';
import { byteMutator, draws } from '../fixtures/byte-mutations.ts';

const random = seededRandom(20260611);
const { int, randomBytes } = draws(random);
const pick = <T>(items: readonly T[]): T => items[int(items.length)];
const packr = new Packr({ useRecords: false });

// Small limits: nothing a fuzzed body says may make a decoder allocate more than 256 KiB a tensor.
const MAX_ELEMENTS = 1 << 16;

const outcomes = new Map<string, number>();
const count = (key: string): void => {
  outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
};
let slowest = { ms: 0, what: '' };

/** Runs one decode: a value passes `check`, an error must be the typed ClusterError. */
function expectOnlyClusterErrors<T>(what: string, decode: () => T, check: (value: T) => void): void {
  const started = performance.now();
  let value: T;
  try {
    value = decode();
  } catch (error) {
    if (!(error instanceof ClusterError) || error.code !== 'TANDEM_CLUSTER_MESSAGE_INVALID') {
      assert.fail(`${what}: the decoder threw something other than a ClusterError TANDEM_CLUSTER_MESSAGE_INVALID: ${error instanceof Error ? error.stack : String(error)}`);
    }
    count(`invalid ${String(error.details.field).replace(/\[\d+\]/, '[i]')}`);
    return;
  } finally {
    const ms = performance.now() - started;
    if (ms > slowest.ms) slowest = { ms, what };
  }
  check(value);
  count(`ok ${what}`);
}

const elementsOf = (shape: Shape3): number => shape[0] * shape[1] * shape[2];

function checkTensor(t: unknown, elements: number, field: string): void {
  assert.ok(t instanceof Float32Array, `${field} is a Float32Array`);
  assert.equal(t.length, elements, `${field} holds the shape's elements`);
}

/** What any decoded request must be, whatever body it came from. */
function checkRequest(r: MiddleRequest, maxElements: number): void {
  const shapeOk = (shape: Shape3): number => {
    assert.equal(shape.length, 3);
    for (const d of shape) assert.ok(Number.isInteger(d) && d >= 1 && d <= maxElements, `shape ${shape}`);
    const elements = elementsOf(shape);
    assert.ok(elements <= maxElements, `shape ${shape} over ${maxElements}`);
    return elements;
  };
  const tapeOk = (id: number): void => assert.ok(Number.isSafeInteger(id) && id >= 1, `tapeId ${id}`);
  switch (r.op) {
    case 'forward':
    case 'backward': {
      assert.ok(Number.isInteger(r.blocks.start) && r.blocks.start >= 0 && r.blocks.end > r.blocks.start && r.blocks.end <= 65536, `blocks ${JSON.stringify(r.blocks)}`);
      const elements = shapeOk(r.shape);
      checkTensor(r.h, elements, 'h');
      if (r.op === 'forward') assert.equal(typeof r.keepTape, 'boolean');
      else checkTensor(r.g, elements, 'g');
      if (r.lora !== undefined) {
        assert.ok(Number.isFinite(r.lora.scale));
        if (r.op === 'forward') assert.equal(r.keepTape, false, 'a held forward keeps no tape');
        let values = 0;
        for (const m of r.lora.modules) {
          assert.match(m.path, /^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+$/);
          checkTensor(m.a, m.r * m.inFeatures, 'lora a');
          checkTensor(m.b, m.outFeatures * m.r, 'lora b');
          values += m.a.length + m.b.length;
        }
        for (const m of r.lora.ia3 ?? []) {
          assert.ok(m.scale instanceof Float32Array && m.scale.length > 0);
          values += m.scale.length;
        }
        assert.ok(r.lora.modules.length + (r.lora.ia3?.length ?? 0) > 0 && values <= maxElements, `lora of ${values} values`);
      }
      break;
    }
    case 'backwardFromTape':
      tapeOk(r.tapeId);
      checkTensor(r.g, shapeOk(r.shape), 'g');
      break;
    case 'dropTape':
      tapeOk(r.tapeId);
      break;
    default:
      assert.fail(`unknown op ${JSON.stringify(r)}`);
  }
}

/** What any decoded reply must be. */
function checkReply(r: MiddleReply, elements: number): void {
  assert.equal(typeof r.worker, 'string');
  assert.ok(r.worker.length <= 128);
  if (r.ok) {
    checkTensor(r.output, elements, 'output');
    assert.equal(typeof r.computeMs, 'number');
    if (r.tapeId !== undefined) assert.ok(Number.isSafeInteger(r.tapeId) && r.tapeId >= 1);
    if (r.savedBytes !== undefined) assert.ok(Number.isSafeInteger(r.savedBytes) && r.savedBytes >= 0);
  } else {
    assert.ok(['tapeLost', 'failed', 'invalid'].includes(r.kind));
    assert.equal(typeof r.message, 'string');
    assert.ok(r.message.length <= 500);
    if (r.code !== undefined) assert.ok(typeof r.code === 'string' && r.code.length <= 64);
  }
}

// ---- Seeds: valid bodies of every op and reply, with what each must decode to. ----

interface Seed<T> {
  name: string;
  /** The body's map before packing (tensors and frames as bytes), for structural mutation. */
  map: Record<string, unknown>;
  bytes: Uint8Array;
  expected: T;
  /** The element count the body's tensors hold. */
  elements: number;
}

const SHAPES: Shape3[] = [[1, 4, 16], [2, 8, 32], [1, 1, 8]];
const blocks = { start: 2, end: 5 };

function frameOf(values: Float32Array, shape: Shape3, codec: 'f16' | 'int8-block', name: string): TensorFrame {
  return encodeTensor(values, shape, codec === 'int8-block' ? { codec, blockSize: 8 } : { codec }, { name });
}

function requestSeeds(): Seed<MiddleRequest>[] {
  const seeds: Seed<MiddleRequest>[] = [];
  const add = (name: string, request: MiddleRequest, expected: MiddleRequest, elements: number): void => {
    const bytes = encodeRequest(request);
    seeds.push({ name, map: packr.unpack(bytes) as Record<string, unknown>, bytes, expected, elements });
  };
  SHAPES.forEach((shape, i) => {
    const n = elementsOf(shape);
    const h = activationLike(n, 10 + i, shape[2]);
    const g = activationLike(n, 20 + i, shape[2]);
    const hFrame = frameOf(h, shape, 'int8-block', 'h_B');
    const gFrame = frameOf(g, shape, 'f16', 'g_M');
    const hf = decodeTensor(hFrame);
    const gf = decodeTensor(gFrame);
    add(`forward keepTape ${i}`, { op: 'forward', blocks, shape, h, keepTape: true }, { op: 'forward', blocks, shape, h, keepTape: true }, n);
    add(`forward ${i}`, { op: 'forward', blocks, shape, h, keepTape: false }, { op: 'forward', blocks, shape, h, keepTape: false }, n);
    add(`forward hFrame ${i}`, { op: 'forward', blocks, shape, h, hFrame, keepTape: true }, { op: 'forward', blocks, shape, h: hf, keepTape: true }, n);
    add(`backward ${i}`, { op: 'backward', blocks, shape, h, g }, { op: 'backward', blocks, shape, h, g }, n);
    add(`backward frames ${i}`, { op: 'backward', blocks, shape, h, g, hFrame, gFrame }, { op: 'backward', blocks, shape, h: hf, g: gf }, n);
    add(`backward gFrame ${i}`, { op: 'backward', blocks, shape, h, g, gFrame }, { op: 'backward', blocks, shape, h, g: gf }, n);
    add(`backwardFromTape ${i}`, { op: 'backwardFromTape', tapeId: 7 + i, shape, g }, { op: 'backwardFromTape', tapeId: 7 + i, shape, g }, n);
    add(`backwardFromTape gFrame ${i}`, { op: 'backwardFromTape', tapeId: 2 ** 40 + i, shape, g, gFrame }, { op: 'backwardFromTape', tapeId: 2 ** 40 + i, shape, g: gf }, n);
  });
  // A held adapter's factors: LoRA on two modules, and (IA)^3 scales.
  const [shape] = SHAPES;
  const n = elementsOf(shape);
  const h = activationLike(n, 40, shape[2]);
  const g = activationLike(n, 41, shape[2]);
  const module = (path: string, r: number, inFeatures: number, outFeatures: number) => ({ path, r, inFeatures, outFeatures, a: activationLike(r * inFeatures, 42, inFeatures), b: activationLike(outFeatures * r, 43, r) });
  const lora = { scale: 2, modules: [module('model.layers.2.self_attn.q_proj', 4, 16, 16), module('model.layers.3.mlp.down_proj', 4, 32, 16)] };
  const ia3 = { scale: 1, modules: [], ia3: [{ path: 'model.layers.2.self_attn.k_proj', feedforward: false, scale: activationLike(8, 44, 8) }, { path: 'model.layers.4.mlp.down_proj', feedforward: true, scale: activationLike(32, 45, 32) }] };
  add('forward lora', { op: 'forward', blocks, shape, h, keepTape: false, lora }, { op: 'forward', blocks, shape, h, keepTape: false, lora }, n);
  add('backward lora', { op: 'backward', blocks, shape, h, g, lora }, { op: 'backward', blocks, shape, h, g, lora }, n);
  add('backward ia3', { op: 'backward', blocks, shape, h, g, lora: ia3 }, { op: 'backward', blocks, shape, h, g, lora: ia3 }, n);
  add('dropTape', { op: 'dropTape', tapeId: 1 }, { op: 'dropTape', tapeId: 1 }, 0);
  add('dropTape max', { op: 'dropTape', tapeId: Number.MAX_SAFE_INTEGER }, { op: 'dropTape', tapeId: Number.MAX_SAFE_INTEGER }, 0);
  return seeds;
}

function replySeeds(): Seed<MiddleReply>[] {
  const seeds: Seed<MiddleReply>[] = [];
  const add = (name: string, reply: MiddleReply, expected: MiddleReply, elements: number): void => {
    const bytes = encodeReply(reply);
    seeds.push({ name, map: packr.unpack(bytes) as Record<string, unknown>, bytes, expected, elements });
  };
  SHAPES.forEach((shape, i) => {
    const n = elementsOf(shape);
    const output = activationLike(n, 30 + i, shape[2]);
    add(`ok ${i}`, { ok: true, worker: `w${i}`, output, computeMs: 1.5 + i }, { ok: true, worker: `w${i}`, output, computeMs: 1.5 + i, tapeId: undefined, savedBytes: undefined }, n);
    add(`ok tape ${i}`, { ok: true, worker: 'w', output, tapeId: 3 + i, savedBytes: 4096 * i, computeMs: 0 }, { ok: true, worker: 'w', output, tapeId: 3 + i, savedBytes: 4096 * i, computeMs: 0 }, n);
  });
  for (const kind of ['tapeLost', 'failed', 'invalid'] as const) {
    add(`${kind}`, { ok: false, worker: 'w9', kind, message: `${kind} here` }, { ok: false, worker: 'w9', kind, message: `${kind} here`, code: undefined }, 4);
    add(`${kind} code`, { ok: false, worker: 'w9', kind, message: 'm', code: 'TANDEM_X' }, { ok: false, worker: 'w9', kind, message: 'm', code: 'TANDEM_X' }, 4);
  }
  return seeds;
}

// ---- Byte mutations. ----

/** msgpack headers claiming huge lengths: arrays, maps, strings, bins and exts of 4 GiB. */
const HUGE_HEADERS = [0xdd, 0xdf, 0xdb, 0xc6, 0xc9].map((t) => [t, 0xff, 0xff, 0xff, 0xff]);

const mutate = byteMutator(random, [
  (bytes) => {
    // A type byte replaced by a huge length header.
    const at = int(bytes.length + 1);
    return new Uint8Array([...bytes.subarray(0, at), ...pick(HUGE_HEADERS), ...bytes.subarray(at + 1)]);
  },
  (bytes) => {
    // A length field's bytes set high (the 4 bytes after a bin32 / str32 / map16 header).
    const at = int(bytes.length + 1);
    for (let k = at; k < Math.min(bytes.length, at + 4); k++) bytes[k] = 0xff;
    return bytes;
  },
]);

// ---- Structural mutations: fields replaced by values of the wrong type or size. ----

const CODECS: CodecName[] = ['f32', 'f16', 'bf16', 'int8-block', 'int4-block', 'topk'];

/** A real frame of `shape`, made wrong: another shape, codec, parameters or payload. */
function hostileFrame(shape: Shape3): Uint8Array {
  const n = elementsOf(shape);
  const frame = frameOf(activationLike(n, int(1000), shape[2]), shape, random() < 0.5 ? 'f16' : 'int8-block', 'x');
  const f: TensorFrame = { ...frame, shape: [...frame.shape], params: { ...frame.params } };
  switch (int(7)) {
    case 0: f.shape = Array.from({ length: int(5) }, () => (random() < 0.5 ? int(40) : int(2 ** 32))); break;
    case 1: f.shape[int(f.shape.length)] = random() < 0.5 ? int(2 ** 32) : int(70); break;
    case 2: f.codec = pick(CODECS); break;
    case 3: f.params.blockSize = random() < 0.5 ? int(2 ** 32) : int(70); break;
    case 4: f.payload = random() < 0.5 ? f.payload.subarray(0, int(f.payload.length + 1)) : randomBytes(int(300)); break;
    case 5: f.params.scales = randomBytes(4 * int(40)); break;
    default: f.shape = [shape[0] * 1024, shape[1] * 1024, shape[2]]; break;
  }
  f.crc32 = random() < 0.8 ? frameChecksum(f) : int(2 ** 32);
  try {
    return encodeFrame(f);
  } catch {
    return mutate(encodeFrame(frame));
  }
}

/** An object whose conversion to a string throws: a body's map can hold a key named toString. */
const UNPRINTABLE: unknown[] = [{ toString: 1 }, { toString: 'x', valueOf: 'y' }, [{ toString: 1 }], [[{ valueOf: 1, toString: null }]]];

function nested(depth: number): unknown {
  let v: unknown = 1;
  for (let i = 0; i < depth; i++) v = random() < 0.5 ? [v] : { a: v };
  return v;
}

/** A value of a wrong type or size for a field of a body whose tensors hold `elements` values. */
function hostileValue(elements: number, shape: Shape3): unknown {
  switch (int(26)) {
    case 0: return pick(['', 'forward', 'backward', 'x'.repeat(1 + int(300)), '1', 'NaN', '\u0000', '\ud800']);
    case 1: return -1 - int(1000);
    case 2: return pick([-0, -1, -(2 ** 31), -(2 ** 53), Number.MIN_SAFE_INTEGER - 2]);
    case 3: return pick([2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e300, Number.MAX_VALUE]);
    case 4: return pick([NaN, Infinity, -Infinity, 0.5, 1.5, 3.000001, Number.EPSILON]);
    case 5: return pick([2n ** 63n - 1n, -(2n ** 63n), 2n ** 53n + 1n, 0n, 1n]);
    case 6: return { start: int(5), end: int(5), shape: [1, 2, 3], op: 'forward' };
    case 7: return [int(10), int(10), int(10)];
    case 8: return Array.from({ length: int(8) }, () => int(70));
    case 9: return pick([true, false, null, undefined]);
    case 10: return new Uint8Array(Math.max(0, elements * 4 + pick([-4, -1, 1, 3, 4, 1024]))).fill(0x41);
    case 11: return randomBytes(int(64));
    case 12: return new Uint8Array(0);
    case 13: return new Uint8Array(elements * 4).fill(0xff); // the right length, all NaNs
    case 14: return hostileFrame(shape);
    case 15: return pick(UNPRINTABLE);
    case 16: return nested(1 + int(200));
    case 17: return new Map<unknown, unknown>([[1, 2], [{ k: 1 }, 'v'], ['start', 1]]);
    case 18: return new Set([1, 2, 3]);
    case 19: return new Date(int(2 ** 40));
    case 20: return new Float32Array(elements); // msgpackr sends a typed array's bytes
    case 21: return new Float64Array(Math.max(1, elements >> 1));
    case 22: return [];
    case 23: return {};
    case 24: return [shape[0], shape[1], shape[2], 1];
    default: return pick([[0, 1, 1], [1, -1, 1], [1, 1, 2 ** 32], [MAX_ELEMENTS, MAX_ELEMENTS, MAX_ELEMENTS], [1.5, 2, 2], ['1', '2', '3']]);
  }
}

const REQUEST_FIELDS = ['op', 'blocks', 'shape', 'h', 'g', 'hFrame', 'gFrame', 'tapeId', 'keepTape', 'lora', '__proto__', 'toString'];
const LORA_FIELDS = ['scale', 'modules', 'ia3', 'toString'];
const MODULE_FIELDS = ['path', 'r', 'inFeatures', 'outFeatures', 'a', 'b', 'feedforward', 'scale', '__proto__'];
const REPLY_FIELDS = ['ok', 'worker', 'output', 'tapeId', 'savedBytes', 'computeMs', 'kind', 'message', 'code', 'toString'];
const OPS = ['forward', 'backward', 'backwardFromTape', 'dropTape'];

function shapeOfSeed(map: Record<string, unknown>): Shape3 {
  return Array.isArray(map.shape) && map.shape.length === 3 ? (map.shape as Shape3) : [1, 4, 16];
}

/** Sets a field as the body's own key: `__proto__` included (a plain assignment would set the prototype). */
function setField(map: Record<string, unknown>, field: string, value: unknown): void {
  Object.defineProperty(map, field, { value, enumerable: true, writable: true, configurable: true });
}

function mutateStructure(seed: Record<string, unknown>, fields: string[], elements: number): Record<string, unknown> {
  const map: Record<string, unknown> = { ...seed };
  const shape = shapeOfSeed(seed);
  const changes = 1 + int(3);
  for (let c = 0; c < changes; c++) {
    switch (int(9)) {
      case 0: {
        // blocks: the wrong types, or end before start.
        const start = random() < 0.7 ? int(70_000) : hostileValue(elements, shape);
        const end = random() < 0.5 ? (typeof start === 'number' ? start - int(3) : int(10)) : hostileValue(elements, shape);
        map.blocks = random() < 0.8 ? { start, end } : { start };
        break;
      }
      case 1: {
        // shape: a dimension replaced, the wrong length, or more elements than the limit.
        const s: unknown[] = [...shape];
        const how = int(4);
        if (how < 2) s[int(3)] = hostileValue(elements, shape);
        else if (how === 2) s.length = int(6);
        else s[int(3)] = MAX_ELEMENTS / 2 + int(MAX_ELEMENTS);
        map.shape = s;
        break;
      }
      case 2:
        delete map[pick(fields)];
        break;
      case 3:
        map.op = random() < 0.7 ? pick(OPS) : hostileValue(elements, shape);
        break;
      case 4: {
        // A held adapter's factors: a field of the adapter or of one module made wrong, or a module repeated many times.
        if (typeof map.lora !== 'object' || map.lora === null) {
          setField(map, pick(fields), hostileValue(elements, shape));
          break;
        }
        const lora: Record<string, unknown> = { ...(map.lora as Record<string, unknown>) };
        const list = Array.isArray(lora.modules) && lora.modules.length > 0 ? 'modules' : 'ia3';
        const modules = Array.isArray(lora[list]) ? [...(lora[list] as Record<string, unknown>[])] : [];
        const how = int(4);
        if (how === 0 || modules.length === 0) setField(lora, pick(LORA_FIELDS), hostileValue(elements, shape));
        else if (how === 1) lora[list] = new Array(pick([2, 100, 2000])).fill(modules[0]);
        else {
          const k = int(modules.length);
          const m = { ...modules[k] };
          setField(m, pick(MODULE_FIELDS), random() < 0.3 ? pick(['model.layers.x.self_attn.q_proj', 'layers.1.q', 'model.layers.1.attn.q_proj', 'model.layers.999999.mlp.up_proj']) : hostileValue(elements, shape));
          modules[k] = m;
          lora[list] = modules;
        }
        map.lora = lora;
        break;
      }
      default:
        setField(map, pick(fields), hostileValue(elements, shape));
        break;
    }
  }
  return map;
}

function packed(map: Record<string, unknown>): Uint8Array | undefined {
  try {
    return packr.pack(map);
  } catch {
    count('unpackable');
    return undefined;
  }
}

// ---- Hand-made msgpack the Packr would not write: extensions, references, records. ----

const ascii = (s: string): number[] => [...Buffer.from(s)];
const str = (s: string): number[] => (s.length < 32 ? [0xa0 | s.length, ...ascii(s)] : [0xd9, s.length, ...ascii(s)]);
/** A map of `op` and `field` with the raw msgpack `value`: a body with that value where a field goes. */
const withRaw = (op: string, field: string, value: number[]): Uint8Array => new Uint8Array([0x82, ...str('op'), ...str(op), ...str(field), ...value]);
const RAW_VALUES: number[][] = [
  [0xd4, 0x65, 0x00, 0x93, ...str('TypeError'), ...str('m'), 0xc0], // an Error extension
  [0xd4, 0x65, 0x00, 0x93, 0x81, ...str('toString'), 0x01, ...str('m'), 0xc0], // an Error named by an object
  [0xd4, 0x78, 0x00, 0x92, ...str('('), 0xa0], // an invalid RegExp
  [0xc7, 0x05, 0x74, 0x07, 0, 0, 0x80, 0x3f], // a Float32Array extension
  [0xc7, 0x04, 0x74, 0x08, 0, 0, 0x80], // a Float64Array extension of unaligned length
  [0xc7, 0x03, 0x74, 0x10, 0, 0], // an ArrayBuffer extension
  [0xd6, 0xff, 0, 0, 0, 1], // a Date
  [0xd6, 0x70, 0, 0, 0, 1], // a pointer to nothing
  [0xd6, 0x69, 0, 0, 0, 1, 0x91, 0xd6, 0x70, 0, 0, 0, 1], // an array holding itself
  [0xd6, 0x69, 0, 0, 0, 2, 0x81, ...str('s'), 0xd6, 0x70, 0, 0, 0, 2], // a map holding itself
  [0xd6, 0x62, 0x7f, 0xff, 0xff, 0xff, 0xc0], // a string bundle of 2 GiB
  [0xd4, 0x72, 0x40, 0x91, ...str('op'), 0x40, ...str('x')], // a record definition
  [0xd4, 0x73, 0x00, 0x93, 1, 2, 3], // a Set
  [0xc1], // the never-used byte
  [0x81, 0x81, ...str('toString'), 0x01, 0x01], // a map keyed by an unprintable map
  [0x81, 0x93, 1, 2, 3, 0x01], // a map keyed by an array
  [0xdd, 0xff, 0xff, 0xff, 0xff], // an array of 4 billion
  [0xdf, 0x7f, 0xff, 0xff, 0xff], // a map of 2 billion
  [0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2], // 4 GiB of bin
  [0xc9, 0x7f, 0xff, 0xff, 0xff, 0x74], // a 2 GiB extension
  [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // uint64 max
  [0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], // int64 min
  [0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
  [0xca, 0x7f, 0x80, 0, 0], // float32 Infinity
];

/** Inputs that once made a decoder throw something other than a ClusterError, kept as they were found. */
const REGRESSIONS: { name: string; request?: Uint8Array; reply?: Uint8Array }[] = [
  // String(op) threw "TypeError: Cannot convert object to primitive value" building the unknown-op message.
  { name: 'op is a map with a toString key', request: packr.pack({ op: { toString: 1 } }) },
  { name: 'op is an array holding such a map', request: packr.pack({ op: [{ toString: 1 }] }) },
  { name: 'op is a map with toString and valueOf keys', request: packr.pack({ op: { toString: 'x', valueOf: 'y' }, tapeId: 1 }) },
];

test('20,000+ random, mutated and hostile cluster bodies: a well-formed value or a ClusterError, bounded memory', { timeout: 60_000 }, () => {
  const requests = requestSeeds();
  const replies = replySeeds();

  // Valid bodies decode to exactly what was encoded (a decoder that refuses everything fails here).
  for (const seed of requests) {
    assert.deepStrictEqual(decodeRequest(seed.bytes, MAX_ELEMENTS), seed.expected, `round trip of request ${seed.name}`);
    checkRequest(decodeRequest(seed.bytes, MAX_ELEMENTS), MAX_ELEMENTS);
  }
  for (const seed of replies) {
    assert.deepStrictEqual(decodeReply(seed.bytes, seed.elements), seed.expected, `round trip of reply ${seed.name}`);
  }

  for (const r of REGRESSIONS) {
    if (r.request !== undefined) {
      assert.throws(() => decodeRequest(r.request as Uint8Array, MAX_ELEMENTS), (e: unknown) => e instanceof ClusterError && e.code === 'TANDEM_CLUSTER_MESSAGE_INVALID', r.name);
    }
    if (r.reply !== undefined) expectOnlyClusterErrors('reply', () => decodeReply(r.reply as Uint8Array, 64), (v) => checkReply(v, 64));
  }

  const start = process.memoryUsage();
  let peak = 0;
  const sample = (): void => {
    const m = process.memoryUsage();
    peak = Math.max(peak, m.heapUsed + m.arrayBuffers - start.heapUsed - start.arrayBuffers);
  };
  let cases = 0;
  const request = (bytes: Uint8Array, maxElements = MAX_ELEMENTS): void => {
    cases++;
    expectOnlyClusterErrors('request', () => decodeRequest(bytes, maxElements), (v) => checkRequest(v, maxElements));
    if (cases % 500 === 0) sample();
  };
  const reply = (bytes: Uint8Array, elements: number): void => {
    cases++;
    expectOnlyClusterErrors('reply', () => decodeReply(bytes, elements), (v) => checkReply(v, elements));
    if (cases % 500 === 0) sample();
  };
  const elementsFor = (seed: Seed<unknown>): number => (random() < 0.9 ? seed.elements : pick([0, 1, 64, 512, seed.elements + 1]));

  // (a) Random bytes of random lengths; a third behind a map header and an op, so parsing gets past the first byte.
  const prefixes = [[], [0x85, ...str('op'), ...str('forward')], [0x83, ...str('ok'), 0xc3]];
  for (let i = 0; i < 5000; i++) {
    const noise = randomBytes(int(int(2) === 0 ? 24 : 400));
    const bytes = new Uint8Array([...prefixes[i % 3], ...noise]);
    request(bytes);
    reply(bytes, pick([0, 4, 64]));
  }

  // (b) Valid bodies with bytes flipped, set, truncated, extended, inserted, deleted, lengths made huge.
  for (let i = 0; i < 6000; i++) {
    const seed = pick(requests);
    request(random() < 0.2 ? mutate(mutate(seed.bytes)) : mutate(seed.bytes), random() < 0.9 ? MAX_ELEMENTS : pick([1, 64, 511]));
  }
  for (let i = 0; i < 2000; i++) {
    const seed = pick(replies);
    reply(random() < 0.2 ? mutate(mutate(seed.bytes)) : mutate(seed.bytes), elementsFor(seed));
  }

  // (c) Valid maps with fields replaced by wrong types and sizes, repacked.
  for (let i = 0; i < 6000; i++) {
    const seed = pick(requests);
    const bytes = packed(mutateStructure(seed.map, REQUEST_FIELDS, seed.elements));
    if (bytes !== undefined) request(bytes);
  }
  for (let i = 0; i < 2000; i++) {
    const seed = pick(replies);
    const map = mutateStructure(seed.map, REPLY_FIELDS, seed.elements);
    if (random() < 0.3) map.ok = true;
    const bytes = packed(map);
    if (bytes !== undefined) reply(bytes, elementsFor(seed));
  }

  // (d) Hand-made msgpack in every field of every op, and as the whole body.
  for (const value of RAW_VALUES) {
    request(new Uint8Array(value));
    reply(new Uint8Array(value), 4);
    for (const op of OPS) for (const field of REQUEST_FIELDS) request(withRaw(op, field, value));
    for (const field of REPLY_FIELDS) reply(withRaw('x', field, value), 4);
  }

  // (e) Deep nesting, beyond msgpackr's stack and just within it.
  for (const depth of [100, 1000, 2000, 3000, 100_000]) {
    request(new Uint8Array([0x81, ...str('op'), ...new Array<number>(depth).fill(0x91), 0xc0]));
    request(new Uint8Array([0x82, ...str('op'), ...str('forward'), ...str('shape'), ...new Array<number>(depth).fill(0x91), 0xc0]));
    reply(new Uint8Array(new Array<number>(depth).fill(0x91)), 4);
  }
  sample();

  const total = [...outcomes].reduce((sum, [, n]) => sum + n, 0);
  console.log(`wire fuzz: ${cases} cases, slowest ${slowest.ms.toFixed(1)} ms (${slowest.what}), peak growth ${(peak / 2 ** 20).toFixed(1)} MiB, outcomes ${JSON.stringify(Object.fromEntries([...outcomes].sort((a, b) => b[1] - a[1])))}`);
  assert.ok(cases >= 20_000, `${cases} cases`);
  assert.equal(total, cases + (outcomes.get('unpackable') ?? 0));
  assert.ok((outcomes.get('ok request') ?? 0) > 500, 'some mutated requests still decode: the fuzzer reaches past the first check');
  assert.ok((outcomes.get('ok reply') ?? 0) > 500, 'some mutated replies still decode');
  assert.ok(outcomes.size >= 15, 'many different refusals are reached');
  assert.ok(peak < 128 * 2 ** 20, `memory grew by ${peak} bytes`);
});
