import assert from 'node:assert/strict';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  SAFETENSORS_DTYPE_SIZES,
  floatToBfloat16,
  floatToHalf,
  fromFloat32,
  halfToFloat,
  parseSafetensors,
  readSafetensorsFile,
  readSafetensorsHeader,
  serializeSafetensors,
  toFloat32,
  writeSafetensorsFile,
} from '../../model/index.ts';
import type { SafetensorsDtype, SafetensorsTensor, SafetensorsTensorInput } from '../../model/index.ts';
import { STORIES_DIR, rejectsModelError, tempDir, throwsModelError } from './helpers.ts';

const FILE = 'bad.safetensors';

/** A file from a header text and a data buffer, the header length taken from the text unless given. */
function rawFile(header: string | Uint8Array, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const h = typeof header === 'string' ? Buffer.from(header, 'utf8') : header;
  const out = new Uint8Array(8 + h.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(h.byteLength), true);
  out.set(h, 8);
  out.set(data, 8 + h.byteLength);
  return out;
}

const f32 = (shape: number[], begin: number, end: number) => ({ dtype: 'F32', shape, data_offsets: [begin, end] });

describe('safetensors writer and reader', () => {
  test('every dtype round-trips with its shape, bytes and metadata; tensors are views of the file', () => {
    const tensors = new Map<string, SafetensorsTensorInput>();
    let seed = 7;
    for (const dtype of Object.keys(SAFETENSORS_DTYPE_SIZES) as SafetensorsDtype[]) {
      const data = new Uint8Array(2 * 3 * SAFETENSORS_DTYPE_SIZES[dtype]).map(() => (seed = (seed * 1103515245 + 12345) & 0xff));
      tensors.set(`t.${dtype}`, { dtype, shape: [2, 3], data });
    }
    tensors.set('scalar', { dtype: 'F32', shape: [], data: new Float32Array([1.5]) });
    tensors.set('empty', { dtype: 'F16', shape: [0, 4], data: new Uint8Array(0) });
    const bytes = serializeSafetensors(tensors, { format: 'pt', note: 'ünïcode' });
    const back = parseSafetensors(bytes, 'roundtrip.safetensors');
    assert.deepEqual(back.metadata, { format: 'pt', note: 'ünïcode' });
    assert.equal(back.tensors.size, tensors.size);
    for (const [name, t] of tensors) {
      const got = back.tensors.get(name) as SafetensorsTensor;
      assert.equal(got.dtype, t.dtype, name);
      assert.deepEqual(got.shape, [...t.shape], name);
      assert.deepEqual([...got.data], [...new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength)], name);
      assert.equal(got.data.buffer, bytes.buffer, `${name} should be a view, not a copy`);
      // Widest dtypes first means every tensor starts aligned to its element size.
      assert.equal(got.data.byteOffset % SAFETENSORS_DTYPE_SIZES[got.dtype], 0, name);
    }
  });

  test('byte layout: u64 LE header length, space padding to 8 bytes, data right after', () => {
    const data = new Float32Array([0, 1, 2, 3, 4, 5]);
    // A 64-byte header needs no padding.
    const exact = serializeSafetensors({ 'attn.0': { dtype: 'F32', shape: [1, 2, 3], data } });
    const json = '{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}';
    assert.equal(json.length, 64);
    assert.deepEqual([...exact.subarray(0, 8)], [64, 0, 0, 0, 0, 0, 0, 0]);
    assert.equal(Buffer.from(exact.subarray(8, 72)).toString(), json);
    assert.deepEqual([...exact.subarray(72)], [...new Uint8Array(data.buffer)]);
    assert.equal(exact.byteLength, 8 + 64 + 24);

    // A 65-byte header is padded with 7 spaces to 72.
    const padded = serializeSafetensors({ attn0: { dtype: 'F32', shape: [1, 1, 2, 3], data } });
    const json2 = '{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}';
    assert.deepEqual([...padded.subarray(0, 8)], [72, 0, 0, 0, 0, 0, 0, 0]);
    assert.equal(Buffer.from(padded.subarray(8, 80)).toString(), json2 + ' '.repeat(72 - json2.length));
    assert.equal((8 + 72) % 8, 0);
    assert.deepEqual(new Float32Array(padded.slice(80).buffer), data);

    // No tensors and no metadata: "{}" and six spaces; metadata only when given.
    assert.deepEqual([...serializeSafetensors({})], [8, 0, 0, 0, 0, 0, 0, 0, ...Buffer.from('{}      ')]);
    const meta = serializeSafetensors({}, { framework: 'pt' });
    assert.equal(Buffer.from(meta.subarray(8)).toString(), '{"__metadata__":{"framework":"pt"}}     ');
  });

  test('a metadata key or tensor named "__proto__" is kept as an entry, read whole and from the header, and written back', async () => {
    const text = '{"__metadata__":{"__proto__":"kept","format":"pt"}}';
    const bytes = new Uint8Array(8 + text.length);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(text.length), true);
    bytes.set(Buffer.from(text), 8);
    const { metadata } = parseSafetensors(bytes, 'm.safetensors');
    assert.deepEqual(Object.entries(metadata), [['__proto__', 'kept'], ['format', 'pt']]);
    assert.equal(Object.getPrototypeOf(metadata), Object.prototype, 'the prototype is untouched');
    const dir = await tempDir();
    await writeFile(join(dir, 'm.safetensors'), bytes);
    assert.deepEqual(Object.entries((await readSafetensorsHeader(join(dir, 'm.safetensors'))).metadata), [['__proto__', 'kept'], ['format', 'pt']]);
    assert.deepEqual(Object.entries(parseSafetensors(serializeSafetensors({}, metadata), 'written').metadata), [['__proto__', 'kept'], ['format', 'pt']]);
    // So is a tensor of that name.
    const tensors = parseSafetensors(serializeSafetensors(new Map([['__proto__', { dtype: 'F32' as const, shape: [2], data: new Float32Array([1, 2]) }]])), 'written').tensors;
    assert.deepEqual([...tensors.keys()], ['__proto__']);
    assert.deepEqual([...toFloat32(tensors.get('__proto__') as SafetensorsTensor, 'written', '__proto__')], [1, 2]);
  });

  test('tensors are laid out widest dtype first, then by name', () => {
    const bytes = serializeSafetensors({
      b: { dtype: 'F32', shape: [1], data: new Float32Array([2]) },
      c: { dtype: 'U8', shape: [1], data: new Uint8Array([3]) },
      a: { dtype: 'F32', shape: [1], data: new Float32Array([1]) },
      d: { dtype: 'F64', shape: [1], data: new Float64Array([4]) },
    });
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    const header = JSON.parse(Buffer.from(bytes.subarray(8, 8 + n)).toString()) as Record<string, { data_offsets: number[] }>;
    assert.deepEqual(Object.keys(header), ['d', 'a', 'b', 'c']);
    assert.deepEqual(
      Object.values(header).map((e) => e.data_offsets),
      [
        [0, 8],
        [8, 12],
        [12, 16],
        [16, 17],
      ],
    );
  });

  test('the writer refuses data whose size does not match dtype and shape, and a tensor named __metadata__', () => {
    throwsModelError(() => serializeSafetensors({ w: { dtype: 'F32', shape: [3], data: new Float32Array(2) } }), 'TANDEM_INPUT_INVALID', 'w');
    throwsModelError(() => serializeSafetensors({ __metadata__: { dtype: 'U8', shape: [0], data: new Uint8Array(0) } }), 'TANDEM_INPUT_INVALID', '__metadata__');
  });

  test('writeSafetensorsFile leaves only the finished file; readSafetensorsFile reads it back', async () => {
    const dir = await tempDir();
    const path = join(dir, 'w.safetensors');
    await writeSafetensorsFile(path, { w: { dtype: 'F32', shape: [2], data: new Float32Array([1, -1]) } });
    assert.deepEqual(await readdir(dir), ['w.safetensors']);
    const back = await readSafetensorsFile(path);
    assert.deepEqual([...toFloat32(back.tensors.get('w') as SafetensorsTensor, path, 'w')], [1, -1]);
    await rejectsModelError(readSafetensorsFile(join(dir, 'nope.safetensors')), 'TANDEM_MODEL_FILE_MISSING', 'nope.safetensors');
  });

  test('a file above maxWholeFileBytes is read tensor by tensor, to the same contents', async () => {
    const path = join(STORIES_DIR, 'model.safetensors');
    const whole = await readSafetensorsFile(path);
    const streamed = await readSafetensorsFile(path, { maxWholeFileBytes: 0 });
    assert.deepEqual(streamed.metadata, whole.metadata);
    assert.deepEqual([...streamed.tensors.keys()], [...whole.tensors.keys()]);
    for (const [name, t] of whole.tensors) {
      const s = streamed.tensors.get(name) as SafetensorsTensor;
      assert.equal(s.dtype, t.dtype);
      assert.deepEqual(s.shape, t.shape);
      assert.ok(Buffer.from(s.data).equals(Buffer.from(t.data)), name);
    }
    const dir = await tempDir();
    const cut = join(dir, 'cut.safetensors');
    await writeFile(cut, (await readFile(path)).subarray(0, 600_000));
    await rejectsModelError(readSafetensorsFile(cut, { maxWholeFileBytes: 0 }), 'TANDEM_SAFETENSORS_TRUNCATED', cut);
    const tiny = join(dir, 'tiny.safetensors');
    await writeFile(tiny, rawFile('{}', new Uint8Array(0), 64n));
    await rejectsModelError(readSafetensorsFile(tiny, { maxWholeFileBytes: 0 }), 'TANDEM_SAFETENSORS_TRUNCATED', tiny);
    const overlap = join(dir, 'overlap.safetensors');
    await writeFile(overlap, rawFile(JSON.stringify({ a: f32([2], 0, 8), b: f32([2], 4, 12) }), new Uint8Array(12)));
    await rejectsModelError(readSafetensorsFile(overlap, { maxWholeFileBytes: 0 }), 'TANDEM_SAFETENSORS_INVALID', overlap, 'tensor b');
  });

  test('reads the stories260K fixture: 48 F32 tensors, metadata format pt', async () => {
    const st = await readSafetensorsFile(join(STORIES_DIR, 'model.safetensors'));
    assert.deepEqual(st.metadata, { format: 'pt' });
    assert.equal(st.tensors.size, 48);
    assert.deepEqual(st.tensors.get('model.embed_tokens.weight')?.shape, [512, 64]);
  });
});

describe('safetensors files that break the format are refused, naming the file and tensor', () => {
  test('shorter than the 8-byte header length', () => {
    throwsModelError(() => parseSafetensors(new Uint8Array(5), FILE), 'TANDEM_SAFETENSORS_TRUNCATED', FILE);
  });

  test('header length beyond the end of the file', () => {
    throwsModelError(() => parseSafetensors(rawFile('{}', new Uint8Array(0), 1000n), FILE), 'TANDEM_SAFETENSORS_TRUNCATED', FILE, '1000');
  });

  test('header length over the 100 MB limit, checked before reading it', () => {
    throwsModelError(() => parseSafetensors(rawFile('{}', new Uint8Array(0), 100_000_001n), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, '100000000');
    throwsModelError(() => parseSafetensors(rawFile('{}', new Uint8Array(0), 0xffffffffffffffffn), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE);
  });

  test('header not UTF-8, not JSON, or not an object', () => {
    throwsModelError(() => parseSafetensors(rawFile(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d])), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'UTF-8');
    throwsModelError(() => parseSafetensors(rawFile('{"a": '), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'JSON');
    throwsModelError(() => parseSafetensors(rawFile('[1, 2]  '), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'object');
    throwsModelError(() => parseSafetensors(rawFile('"text"  '), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE);
    throwsModelError(() => parseSafetensors(rawFile('{"w": 3}'), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'w');
  });

  test('a key given twice', () => {
    const header = `{"w":${JSON.stringify(f32([1], 0, 4))},"w":${JSON.stringify(f32([1], 0, 4))}}`;
    throwsModelError(() => parseSafetensors(rawFile(header, new Uint8Array(4)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'w');
    const meta = '{"__metadata__":{"k":"a","k":"b"}}';
    throwsModelError(() => parseSafetensors(rawFile(meta), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, '"k"');
  });

  test('unknown dtype', () => {
    const header = JSON.stringify({ w: { dtype: 'F17', shape: [1], data_offsets: [0, 4] } });
    throwsModelError(() => parseSafetensors(rawFile(header, new Uint8Array(4)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'tensor w', 'F17');
  });

  test('entry fields: missing, extra, bad shape, bad offsets', () => {
    const cases: unknown[] = [
      { dtype: 'F32', shape: [1] },
      { ...f32([1], 0, 4), extra: 1 },
      f32([-1], 0, 4),
      f32([1.5], 0, 4),
      { dtype: 'F32', shape: 4, data_offsets: [0, 16] },
      { dtype: 'F32', shape: [1], data_offsets: [0] },
      { dtype: 'F32', shape: [1], data_offsets: [4, 0] },
    ];
    for (const entry of cases) {
      throwsModelError(() => parseSafetensors(rawFile(JSON.stringify({ w: entry }), new Uint8Array(4)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'tensor w');
    }
  });

  test('offsets that do not span shape times dtype size', () => {
    const header = JSON.stringify({ w: f32([2, 2], 0, 12) });
    throwsModelError(() => parseSafetensors(rawFile(header, new Uint8Array(12)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'tensor w', '16');
  });

  test('offsets outside the data buffer', () => {
    const header = JSON.stringify({ a: f32([1], 0, 4), w: f32([4], 4, 20) });
    throwsModelError(() => parseSafetensors(rawFile(header, new Uint8Array(8)), FILE), 'TANDEM_SAFETENSORS_TRUNCATED', FILE, 'tensor w');
  });

  test('overlapping tensors', () => {
    const header = JSON.stringify({ a: f32([2], 0, 8), b: f32([2], 4, 12) });
    throwsModelError(() => parseSafetensors(rawFile(header, new Uint8Array(12)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'tensor b', 'overlap');
  });

  test('a hole in the data buffer, and trailing bytes after the last tensor', () => {
    const hole = JSON.stringify({ a: f32([1], 0, 4), b: f32([1], 8, 12) });
    throwsModelError(() => parseSafetensors(rawFile(hole, new Uint8Array(12)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'tensor b', '[4, 8)');
    const trailing = JSON.stringify({ a: f32([1], 0, 4) });
    throwsModelError(() => parseSafetensors(rawFile(trailing, new Uint8Array(6)), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, 'trailing');
  });

  test('__metadata__ that is not a map of strings to strings', () => {
    for (const meta of ['[]', '"pt"', '{"format":1}', '{"a":{"b":"c"}}']) {
      throwsModelError(() => parseSafetensors(rawFile(`{"__metadata__":${meta}}`), FILE), 'TANDEM_SAFETENSORS_INVALID', FILE, '__metadata__');
    }
  });

  test('maxTensors bounds the entries a header names before it is parsed; names with quotes and braces count once', () => {
    const tensors = Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`t${i}`, { dtype: 'F32' as const, shape: [1], data: new Float32Array([i]) }]));
    const bytes = serializeSafetensors(tensors, { format: 'pt' });
    assert.equal(parseSafetensors(bytes, FILE, { maxTensors: 5 }).tensors.size, 5, 'five tensors and __metadata__ pass a limit of five');
    throwsModelError(() => parseSafetensors(bytes, FILE, { maxTensors: 4 }), 'TANDEM_SAFETENSORS_INVALID', FILE, 'more than 4 tensors');
    // A name full of quotes and braces is one key.
    const odd = serializeSafetensors({ 'a\\"{,"b":{': { dtype: 'F32', shape: [1], data: new Float32Array([1]) } });
    assert.equal(parseSafetensors(odd, FILE, { maxTensors: 1 }).tensors.size, 1);
    // Counted before JSON.parse: a header past the limit is refused for its size even where its
    // JSON would fail further on.
    const many = `{${Array.from({ length: 20_000 }, (_, i) => `"t${i}":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`).join(',')},"broken":}`;
    throwsModelError(() => parseSafetensors(rawFile(many), FILE, { maxTensors: 16_384 }), 'TANDEM_SAFETENSORS_INVALID', 'more than 16384 tensors');
    throwsModelError(() => parseSafetensors(rawFile(many), FILE), 'TANDEM_SAFETENSORS_INVALID', 'not valid JSON');
  });

  test('readSafetensorsHeader reads the header alone and checks the data length against the file size', async () => {
    const whole = await readSafetensorsFile(join(STORIES_DIR, 'model.safetensors'));
    const header = await readSafetensorsHeader(join(STORIES_DIR, 'model.safetensors'));
    assert.deepEqual(header.metadata, whole.metadata);
    assert.deepEqual([...header.tensors].map(([k, t]) => [k, t.dtype, t.shape]), [...whole.tensors].map(([k, t]) => [k, t.dtype, t.shape]));
    const dir = await tempDir();
    const bytes = new Uint8Array(await readFile(join(STORIES_DIR, 'model.safetensors')));
    const cut = join(dir, 'cut.safetensors');
    await writeFile(cut, bytes.subarray(0, bytes.byteLength - 1000));
    await rejectsModelError(readSafetensorsHeader(cut), 'TANDEM_SAFETENSORS_TRUNCATED', cut);
    const short = join(dir, 'short.safetensors');
    await writeFile(short, bytes.subarray(0, 5));
    await rejectsModelError(readSafetensorsHeader(short), 'TANDEM_SAFETENSORS_TRUNCATED', short, '8-byte');
    const longer = join(dir, 'longer.safetensors');
    await writeFile(longer, Buffer.concat([bytes, new Uint8Array(4)]));
    await rejectsModelError(readSafetensorsHeader(longer), 'TANDEM_SAFETENSORS_INVALID', longer, 'trailing');
    const deep = join(dir, 'deep.safetensors');
    await writeFile(deep, rawFile(`{"a":${'['.repeat(20)}${']'.repeat(20)}}`));
    await rejectsModelError(readSafetensorsHeader(deep), 'TANDEM_SAFETENSORS_INVALID', deep, 'nests deeper');
    const huge = join(dir, 'huge.safetensors');
    await writeFile(huge, rawFile('{}', new Uint8Array(0), 100_000_001n));
    await rejectsModelError(readSafetensorsHeader(huge), 'TANDEM_SAFETENSORS_INVALID', huge, '100000000');
    await rejectsModelError(readSafetensorsHeader(join(dir, 'absent.safetensors')), 'TANDEM_MODEL_FILE_MISSING');
  });

  test('a real file cut short', async () => {
    const bytes = new Uint8Array(await readFile(join(STORIES_DIR, 'model.safetensors')));
    throwsModelError(() => parseSafetensors(bytes.subarray(0, bytes.byteLength - 1000), 'cut.safetensors'), 'TANDEM_SAFETENSORS_TRUNCATED', 'cut.safetensors');
    throwsModelError(() => parseSafetensors(bytes.subarray(0, 100), 'cut.safetensors'), 'TANDEM_SAFETENSORS_TRUNCATED', 'cut.safetensors');
  });
});

function entryOf(dtype: SafetensorsDtype, words: number[], offset = 0): SafetensorsTensor {
  const size = SAFETENSORS_DTYPE_SIZES[dtype];
  const buf = new Uint8Array(offset + words.length * size);
  const view = new DataView(buf.buffer);
  words.forEach((w, i) => (size === 2 ? view.setUint16(offset + i * 2, w, true) : view.setFloat64(offset + i * 8, w, true)));
  return { dtype, shape: [words.length], data: buf.subarray(offset) };
}

describe('float conversions', () => {
  test('F16 bit patterns decode to their IEEE values, aligned or not', () => {
    const bits = [0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x7c00, 0xfc00, 0x0000, 0x8000, 0x3555];
    const want = [1, -2, 65504, 2 ** -24, 1023 * 2 ** -24, 2 ** -14, Infinity, -Infinity, 0, -0, Math.fround(0.333251953125)];
    for (const offset of [0, 1]) {
      const got = toFloat32(entryOf('F16', bits, offset), FILE, 'h');
      assert.deepEqual([...got], want);
    }
    assert.ok(Number.isNaN(toFloat32(entryOf('F16', [0x7e00]), FILE, 'h')[0]));
  });

  test('BF16 is the upper half of a float32', () => {
    const got = toFloat32(entryOf('BF16', [0x3f80, 0x4049, 0xc000, 0x7f80, 0x0001], 1), FILE, 'b');
    assert.deepEqual([...got], [1, 3.140625, -2, Infinity, Math.fround(2 ** -133)]);
  });

  test('F64 narrows to float32; F32 stays a view when aligned and is copied when not', () => {
    assert.deepEqual([...toFloat32(entryOf('F64', [0.1, -3]), FILE, 'd')], [Math.fround(0.1), -3]);
    const bytes = new Uint8Array(9);
    new DataView(bytes.buffer).setFloat32(1, 2.5, true);
    new DataView(bytes.buffer).setFloat32(5, -7, true);
    assert.deepEqual([...toFloat32({ dtype: 'F32', shape: [2], data: bytes.subarray(1) }, FILE, 'f')], [2.5, -7]);
    const aligned = { dtype: 'F32' as const, shape: [2], data: bytes.slice(1) };
    assert.equal(toFloat32(aligned, FILE, 'f').buffer, aligned.data.buffer);
  });

  test('integer dtypes are not weights: a typed error naming file and tensor', () => {
    throwsModelError(() => toFloat32({ dtype: 'I32', shape: [1], data: new Uint8Array(4) }, FILE, 'ids'), 'TANDEM_TENSOR_DTYPE_UNSUPPORTED', FILE, 'tensor ids', 'I32');
  });

  test('float32 -> F16 inverts F16 -> float32 for every non-NaN half, and rounds to nearest even', () => {
    for (let h = 0; h < 0x10000; h++) {
      const v = halfToFloat(h);
      if (!Number.isNaN(v)) assert.equal(floatToHalf(v), h, `0x${h.toString(16)}`);
    }
    assert.equal(floatToHalf(1 + 2 ** -11), 0x3c00); // tie, to even
    assert.equal(floatToHalf(1 + 3 * 2 ** -11), 0x3c02); // tie, to even (up)
    assert.equal(floatToHalf(65519), 0x7bff);
    assert.equal(floatToHalf(65520), 0x7c00); // overflows to infinity
    assert.equal(floatToHalf(2 ** -25), 0x0000); // tie between 0 and the least subnormal
    assert.equal(floatToHalf(0.75 * 2 ** -24), 0x0001);
    assert.equal(floatToHalf(-1e-10), 0x8000);
    assert.ok(Number.isNaN(halfToFloat(floatToHalf(NaN))));
  });

  test('float32 -> BF16 rounds to nearest even and keeps NaN a NaN', () => {
    assert.equal(floatToBfloat16(1), 0x3f80);
    assert.equal(floatToBfloat16(Math.PI), 0x4049);
    assert.equal(floatToBfloat16(3.140625), 0x4049);
    assert.equal(floatToBfloat16(-Infinity), 0xff80);
    assert.equal(floatToBfloat16(NaN) & 0x7f80, 0x7f80);
    assert.notEqual(floatToBfloat16(NaN) & 0x7f, 0);
    const v = new Float32Array([1, -2, 0.5, 3.140625]);
    const back = toFloat32({ dtype: 'BF16', shape: [4], data: fromFloat32(v, 'BF16') }, FILE, 'b');
    assert.deepEqual(back, v);
  });
});
