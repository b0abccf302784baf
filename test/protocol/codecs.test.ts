// Each codec's round trip stays within its stated error bound (protocol/README.md).
import test from 'node:test';
import assert from 'node:assert/strict';
import { ErrorFeedback, FeedbackLedger, ProtocolError, crc32, decodeTensor, encodeTensor } from '../../protocol/index.ts';
import type { CodecSpec } from '../../protocol/index.ts';
import { f16ToNumber, f32BitsToF16 } from '../../protocol/codecs/half.ts';
import { activationLike, randomUniform } from '../fixtures/protocol/activations.ts';

const N = 65536 + 37; // not a multiple of any block size: the tail block is exercised
const DATASETS: Record<string, Float32Array> = {
  random: randomUniform(N, 1, 3),
  activations: activationLike(N, 2),
};

const bits = new Uint32Array(1);
const asFloat = new Float32Array(bits.buffer);
const f32OfBits = (u: number): number => {
  bits[0] = u;
  return asFloat[0];
};

function roundTrip(x: Float32Array, spec: CodecSpec): Float32Array {
  return decodeTensor(encodeTensor(x, [x.length], spec), { shape: [x.length] });
}

function scalesOf(x: Float32Array, blockSize: number, qmax: number): Float32Array {
  const scales = new Float32Array(Math.ceil(x.length / blockSize));
  for (let i = 0; i < x.length; i++) scales[(i / blockSize) | 0] = Math.max(scales[(i / blockSize) | 0], Math.abs(x[i]));
  return scales.map((a) => Math.fround(a / qmax));
}

test('crc32 matches the IEEE check values', () => {
  const ascii = (s: string) => new TextEncoder().encode(s);
  assert.equal(crc32(ascii('123456789')), 0xcbf43926);
  assert.equal(crc32(ascii('The quick brown fox jumps over the lazy dog')), 0x414fa339);
  assert.equal(crc32(new Uint8Array(0)), 0);
  const long = new Uint8Array(1000).map((_, i) => (i * 7919) & 0xff);
  assert.equal(crc32(long.subarray(300), crc32(long.subarray(0, 300))), crc32(long), 'chains over pieces');
  const unaligned = new Uint8Array(1001);
  unaligned.set(long, 1);
  assert.equal(crc32(unaligned.subarray(1)), crc32(long), 'aligned and unaligned paths agree');
});

test('f16: every half value survives the round trip; ties round to even; range and subnormals', () => {
  for (let h = 0; h < 0x10000; h++) {
    const v = f16ToNumber(h);
    const back = f32BitsToF16(new Uint32Array(new Float32Array([v]).buffer)[0]);
    if (Number.isNaN(v)) assert.equal(back & 0x7c00, 0x7c00, `NaN ${h} stays NaN`);
    else assert.equal(back, h, `half 0x${h.toString(16)}`);
  }
  const toHalf = (x: number) => f32BitsToF16(new Uint32Array(new Float32Array([x]).buffer)[0]);
  assert.equal(toHalf(1 + 2 ** -11), 0x3c00, '1 + half an ulp rounds down to even 1');
  assert.equal(toHalf(1 + 3 * 2 ** -11), 0x3c02, '1 + 1.5 ulp rounds up to even');
  assert.equal(toHalf(65504), 0x7bff);
  assert.equal(toHalf(65519.99), 0x7bff);
  assert.equal(toHalf(65520), 0x7c00);
  assert.equal(toHalf(-Infinity), 0xfc00);
  assert.equal(toHalf(2 ** -24), 0x0001);
  assert.equal(toHalf(2 ** -25), 0x0000, 'halfway to the smallest subnormal rounds to even 0');
  assert.equal(toHalf(f32OfBits(0x33000001)), 0x0001);
  assert.equal(toHalf(3 * 2 ** -25), 0x0002, '1.5 subnormal units round to even 2');
  assert.equal(toHalf(2 ** -14 - 2 ** -25), 0x0400, 'rounding carries into the smallest normal');
  assert.equal(toHalf(-0), 0x8000);
});

for (const [dataName, x] of Object.entries(DATASETS)) {
  test(`f32 is exact on ${dataName} data`, () => {
    assert.deepEqual(roundTrip(x, { codec: 'f32' }), x);
  });

  test(`f16 error <= 2^-11 |x| (2^-25 below 2^-14) on ${dataName} data`, () => {
    const y = roundTrip(x, { codec: 'f16' });
    for (let i = 0; i < x.length; i++) {
      const bound = Math.abs(x[i]) >= 2 ** -14 ? 2 ** -11 * Math.abs(x[i]) : 2 ** -25;
      assert.ok(Math.abs(y[i] - x[i]) <= bound, `element ${i}: ${x[i]} -> ${y[i]}`);
    }
  });

  test(`bf16 error <= 2^-8 |x| on ${dataName} data`, () => {
    const y = roundTrip(x, { codec: 'bf16' });
    for (let i = 0; i < x.length; i++) assert.ok(Math.abs(y[i] - x[i]) <= 2 ** -8 * Math.abs(x[i]), `element ${i}: ${x[i]} -> ${y[i]}`);
  });

  for (const [codec, qmax] of [['int8-block', 127], ['int4-block', 7]] as const) {
    for (const blockSize of [64, 32, 30, 1]) {
      test(`${codec} (block ${blockSize}) error <= scale/2 + 2^-24 |x'| on ${dataName} data`, () => {
        const y = roundTrip(x, { codec, blockSize });
        const scales = scalesOf(x, blockSize, qmax);
        let worst = 0;
        for (let i = 0; i < x.length; i++) {
          const scale = scales[(i / blockSize) | 0];
          const err = Math.abs(y[i] - x[i]);
          assert.ok(err <= scale / 2 + 2 ** -24 * Math.abs(y[i]), `element ${i}: ${x[i]} -> ${y[i]}, scale ${scale}`);
          worst = Math.max(worst, err / scale);
        }
        if (blockSize > 1) assert.ok(worst > 0.4, 'the bound is tight, not vacuous');
      });
    }
  }

  for (const values of ['f16', 'int8-block'] as const) {
    test(`topk (${values} values) keeps the k largest |x| within the value codec's bound on ${dataName} data`, () => {
      const fraction = 0.05;
      const frame = encodeTensor(x, [x.length], { codec: 'topk', topkFraction: fraction, topkValues: values });
      const y = decodeTensor(frame, { shape: [x.length] });
      const k = Math.round(x.length * fraction);
      assert.equal(frame.params.k, k);
      const threshold = [...x].map(Math.abs).sort((a, b) => b - a)[k - 1];
      // The kept values in index order, and (for int8) their block scales as the encoder computes them.
      const keptIndices = [...x.keys()].filter((i) => Math.abs(x[i]) >= threshold);
      assert.equal(keptIndices.length, k, 'no ties at the threshold in this data');
      const keptScales = scalesOf(new Float32Array(keptIndices.map((i) => x[i])), 64, 127);
      const isKept = new Map(keptIndices.map((i, j) => [i, j]));
      for (let i = 0; i < x.length; i++) {
        const j = isKept.get(i);
        if (j === undefined) {
          assert.equal(y[i], 0, `dropped element ${i} decodes to 0`);
          continue;
        }
        const bound = values === 'f16' ? 2 ** -11 * Math.abs(x[i]) : keptScales[(j / 64) | 0] / 2 + 2 ** -24 * Math.abs(y[i]);
        assert.ok(Math.abs(y[i] - x[i]) <= bound, `kept element ${i}: ${x[i]} -> ${y[i]}`);
      }
    });
  }
}

test('bf16 rounds ties to even and keeps NaN a NaN', () => {
  const x = new Float32Array([f32OfBits(0x3f808000), f32OfBits(0x3f818000), f32OfBits(0x3f808001), NaN, -0]);
  const y = decodeTensor(encodeTensor(x, [5], { codec: 'bf16' }), { allowNonFinite: true });
  const words = new Uint32Array(y.buffer);
  assert.equal(words[0], 0x3f800000, 'tie, even below');
  assert.equal(words[1], 0x3f820000, 'tie, odd below: up');
  assert.equal(words[2], 0x3f810000, 'above the tie: up');
  assert.ok(Number.isNaN(y[3]));
  assert.equal(words[4], 0x80000000);
});

test('int8 and int4 refuse NaN and infinities in the input; f32 does when asked', () => {
  for (const codec of ['int8-block', 'int4-block', 'topk'] as const) {
    const x = new Float32Array(100);
    x[77] = NaN;
    assert.throws(() => encodeTensor(x, [100], { codec }), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FRAME_NON_FINITE');
  }
  const x = new Float32Array([1, Infinity]);
  assert.throws(() => encodeTensor(x, [2], { codec: 'f32' }, { checkFinite: true }), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_FRAME_NON_FINITE' && e.details.index === 1);
  assert.throws(() => encodeTensor(new Float32Array([70000]), [1], { codec: 'f16' }), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_INPUT_INVALID');
});

/** Relative error of the stream's running sum (received vs sent) after each of `checkpoints` steps. */
function streamSumErrors(spec: CodecSpec, feedback: boolean, checkpoints: number[]): number[] {
  const n = 2048;
  const sent = new Float64Array(n);
  const received = new Float64Array(n);
  const ef = new ErrorFeedback(spec);
  const errors: number[] = [];
  for (let t = 1; t <= Math.max(...checkpoints); t++) {
    // Gradients with a persistent small signal under noise: what a lossy codec without feedback loses.
    const noise = activationLike(n, 100 + t, 256);
    const x = new Float32Array(n);
    for (let i = 0; i < n; i++) x[i] = 0.05 * Math.sin(i) + 0.02 * noise[i];
    const y = decodeTensor(feedback ? ef.encode('g_M', x, [n]) : encodeTensor(x, [n], spec));
    for (let i = 0; i < n; i++) {
      sent[i] += x[i];
      received[i] += y[i];
    }
    if (checkpoints.includes(t)) {
      let diff = 0;
      let norm = 0;
      for (let i = 0; i < n; i++) {
        diff += (sent[i] - received[i]) ** 2;
        norm += sent[i] ** 2;
      }
      errors.push(Math.sqrt(diff / norm));
    }
  }
  return errors;
}

for (const spec of [{ codec: 'topk', topkFraction: 0.05, topkValues: 'int8-block' }, { codec: 'int4-block', blockSize: 64 }] as CodecSpec[]) {
  test(`error feedback makes the sum of decoded ${spec.codec} tensors converge to the sum sent`, () => {
    const [early, late] = streamSumErrors(spec, true, [100, 400]);
    const [, without] = streamSumErrors(spec, false, [100, 400]);
    console.log(`${spec.codec}: relative error of the stream's sum with feedback ${early.toFixed(4)} at 100 steps, ${late.toFixed(4)} at 400; without ${without.toFixed(4)}`);
    // The gap stays one bounded residual, so relative to a growing sum it shrinks like 1/steps.
    assert.ok(late < early / 2, `with feedback: ${early} at 100 steps, ${late} at 400`);
    assert.ok(late < without / 10, `at 400 steps: feedback ${late}, none ${without}`);
  });
}

test('error feedback keeps one residual per stream and refuses a stream that changes size', () => {
  const ef = new ErrorFeedback({ codec: 'int4-block' });
  ef.encode('a', new Float32Array([1, 2, 3, 0.1]), [4]);
  ef.encode('b', new Float32Array([5, 6]), [2]);
  assert.equal(ef.streams, 2);
  assert.ok(Math.abs(ef.residual('a')![3] - 0.1) < 1e-6, 'what int4 lost on stream a is kept');
  assert.throws(() => ef.encode('a', new Float32Array(3), [3]), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_INPUT_INVALID');
  ef.reset('a');
  ef.encode('a', new Float32Array(3), [3]);
  ef.clear();
  assert.equal(ef.streams, 0);
});

test('error feedback holds at most maxBytes of residuals: streams named by the peer give up the least recently used first', () => {
  const n = 256; // 1 KiB a residual
  const ef = new ErrorFeedback({ codec: 'int8-block' }, { maxBytes: 4 * 1024 });
  const x = activationLike(n, 7, 64);
  for (let i = 0; i < 1000; i++) ef.encode(`g_B/${i}`, x, [n]);
  assert.equal(ef.streams, 4);
  assert.equal(ef.bytes, 4 * 1024);
  assert.deepEqual([996, 997, 998, 999].map((i) => ef.residual(`g_B/${i}`) !== undefined), [true, true, true, true]);
  assert.equal(ef.residual('g_B/0'), undefined);
  // Using a stream keeps it: the one used least recently goes instead.
  ef.encode('g_B/996', x, [n]);
  ef.encode('g_B/fresh', x, [n]);
  assert.equal(ef.residual('g_B/997'), undefined);
  assert.ok(ef.residual('g_B/996') !== undefined);
  // A stream over the bound alone is still kept while it is the one being encoded.
  const big = activationLike(5 * n, 8, 64);
  ef.encode('big', big, [5 * n]);
  assert.equal(ef.streams, 1);
  assert.equal(ef.bytes, 5 * 4 * n);
  ef.reset('big');
  assert.equal(ef.bytes, 0);
});

test('error feedbacks sharing a ledger hold at most its bytes together, the least recently used stream of any given up first', () => {
  const n = 256; // 1 KiB a residual
  const ledger = new FeedbackLedger(3 * 1024);
  const a = new ErrorFeedback({ codec: 'int8-block' }, { ledger });
  const b = new ErrorFeedback({ codec: 'int8-block' }, { ledger });
  const x = activationLike(n, 9, 64);
  a.encode('g_B/0', x, [n]);
  a.encode('g_B/1', x, [n]);
  b.encode('g_B/0', x, [n]);
  assert.equal(ledger.bytes, 3 * 1024);
  b.encode('g_B/1', x, [n]); // over the ledger: a's g_B/0 is the least recently used
  assert.equal(ledger.bytes, 3 * 1024);
  assert.equal(a.residual('g_B/0'), undefined);
  assert.equal(a.bytes + b.bytes, ledger.bytes, 'each feedback counts what the ledger counts');
  a.encode('g_B/1', x, [n]); // used again: b's g_B/0 goes next
  b.encode('g_B/2', x, [n]);
  assert.equal(b.residual('g_B/0'), undefined);
  assert.ok(a.residual('g_B/1') !== undefined);
  // Clearing one feedback (its session closed) gives its bytes back.
  a.clear();
  assert.equal(ledger.bytes, b.bytes);
  assert.equal(b.streams, 2);
  // A feedback's own bound still holds within the ledger's.
  const c = new ErrorFeedback({ codec: 'int8-block' }, { ledger, maxBytes: 1024 });
  c.encode('s', x, [n]);
  c.encode('t', x, [n]);
  assert.equal(c.streams, 1);
  assert.equal(ledger.bytes, b.bytes + c.bytes);
  assert.throws(() => new FeedbackLedger(-1), (e: unknown) => e instanceof ProtocolError && e.code === 'TANDEM_PROTO_INPUT_INVALID');
});
