import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CRC32_IMPLEMENTATION, crc32, crc32Js } from '../../protocol/index.ts';

describe('crc32', () => {
  it("uses Node's native zlib.crc32 where the runtime has it", () => {
    const zlib = process.getBuiltinModule?.('node:zlib') as { crc32?: unknown } | undefined;
    assert.equal(CRC32_IMPLEMENTATION, typeof zlib?.crc32 === 'function' ? 'native' : 'js');
  });

  it('gives the check value of CRC-32/ISO-HDLC on both implementations', () => {
    const check = new TextEncoder().encode('123456789');
    assert.equal(crc32(check), 0xcbf43926);
    assert.equal(crc32Js(check), 0xcbf43926);
    assert.equal(crc32(new Uint8Array(0)), 0);
    assert.equal(crc32Js(new Uint8Array(0)), 0);
  });

  it('continues a CRC over no bytes unchanged, also for an empty array whose buffer was read (zlib.crc32 answers 0 for one)', () => {
    const empty = new Uint8Array(0);
    void empty.buffer; // Node 20 gives the array a null data pointer from here on
    const check = new TextEncoder().encode('123456789');
    assert.equal(crc32(empty, crc32(check)), 0xcbf43926);
    assert.equal(crc32(empty, 5), 5);
    assert.equal(crc32(check.subarray(9), 7), 7);
  });

  it('agrees with the JS fallback on every length, alignment and chained call', () => {
    const bytes = new Uint8Array(4099);
    let x = 12345;
    for (let i = 0; i < bytes.length; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      bytes[i] = x >>> 24;
    }
    for (const [from, to] of [
      [0, 0],
      [0, 1],
      [1, 8],
      [3, 67],
      [0, 64],
      [2, 1000],
      [0, 4099],
      [5, 4099],
    ]) {
      const view = bytes.subarray(from, to);
      assert.equal(crc32(view), crc32Js(view), `[${from}, ${to})`);
    }
    const whole = crc32Js(bytes);
    assert.equal(crc32(bytes.subarray(1000), crc32(bytes.subarray(0, 1000))), whole);
    assert.equal(crc32Js(bytes.subarray(1000), crc32Js(bytes.subarray(0, 1000))), whole);
  });
});
