// The WebAssembly SIMD int8 kernel: its bytes are those of int8-block.wat, and it agrees with
// the JS loops (to the rounding of ties) on random and activation-like data.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { ProtocolError } from '../../protocol/index.ts';
import { dequantizeInt8Blocks, dequantizeInt8BlocksScalar, quantizeBlocks, quantizeBlocksScalar } from '../../protocol/codecs/int8-block.ts';
import { int8Kernel } from '../../protocol/codecs/simd/int8-kernel.ts';
import { compileInt8Wat, generatedSource } from '../fixtures/protocol/build-simd.ts';
import { activationLike } from '../fixtures/protocol/activations.ts';

test('the generated module is int8-block.wat compiled (run test/fixtures/protocol/build-simd.ts when this fails)', async () => {
  const generated = readFileSync(new URL('../../protocol/codecs/simd/int8-block.generated.ts', import.meta.url), 'utf8');
  assert.equal(generated, generatedSource(await compileInt8Wat()));
  assert.ok(int8Kernel(), 'Node 20 has WebAssembly SIMD');
});

test('SIMD and JS quantization agree: scales exactly, values to one step on ties, both within scale / 2', () => {
  for (const [n, blockSize] of [[4096, 64], [1000, 16], [777, 128], [64 * 33 + 5, 64]] as const) {
    for (const x of [Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898) * 43758.5453 % 3), activationLike(n, 7, 64)]) {
      const blocks = Math.ceil(n / blockSize);
      const [qs, ss, qj, sj] = [new Int8Array(n + 4), new Float32Array(blocks), new Int8Array(n + 4), new Float32Array(blocks)];
      quantizeBlocks(x, blockSize, 127, qs, ss);
      quantizeBlocksScalar(x, blockSize, 127, qj, sj);
      const outS = new Float32Array(n);
      const outJ = new Float32Array(n);
      dequantizeInt8Blocks(qs, ss, blockSize, outS);
      dequantizeInt8BlocksScalar(qs, ss, blockSize, outJ);
      assert.deepEqual(outS, outJ, 'dequantization is exact either way');
      for (let b = 0; b < blocks; b++) assert.ok(Math.abs(ss[b] - sj[b]) <= Math.abs(sj[b]) * 2 ** -23, `scale ${b}`);
      let ties = 0;
      for (let i = 0; i < n; i++) {
        const scale = ss[Math.floor(i / blockSize)];
        assert.ok(Math.abs(qs[i] - qj[i]) <= 1, `element ${i}`);
        if (qs[i] !== qj[i]) ties++;
        assert.ok(Math.abs(x[i] - outS[i]) <= scale / 2 + 2 ** -24 * Math.abs(outS[i]) + 1e-7 * scale, `bound at ${i}`);
      }
      assert.ok(ties <= n / 1000, `only ties differ (${ties} of ${n})`);
    }
  }
});

test('SIMD quantization refuses NaN and infinity, naming the first bad element', () => {
  for (const bad of [NaN, Infinity, -Infinity]) {
    const x = activationLike(64 * 8, 3, 64);
    x[64 * 5 + 17] = bad;
    x[64 * 5 + 40] = NaN;
    assert.throws(
      () => quantizeBlocks(x, 64, 127, new Int8Array(x.length), new Float32Array(8)),
      (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FRAME_NON_FINITE' && e.details?.index === 64 * 5 + 17,
    );
  }
});
