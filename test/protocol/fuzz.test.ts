// 100,000+ random and mutated envelopes and frames: decoding only ever returns a value or
// throws a ProtocolError with a catalogued code; nothing hangs and memory stays bounded.
import { readdirSync, readFileSync } from 'node:fs';
import test from 'node:test';
import assert from 'node:assert/strict';
import {
  DEFAULT_LIMITS, ProtocolError, Reassembler, decodeEnvelope, decodeTensor, encodeEnvelope, encodeTensor, envelope,
  frameChecksum, isProtocolErrorCode, negotiateVersion, splitMessage,
} from '../../protocol/index.ts';
import type { CodecName, CodecSpec, TensorFrame } from '../../protocol/index.ts';
import { activationLike, seededRandom } from '../fixtures/protocol/activations.ts';
import { byteMutator, draws } from '../fixtures/byte-mutations.ts';

const random = seededRandom(20261128);
const { int, randomBytes } = draws(random);

// Small limits: a fuzzed frame can never make the decoder allocate more than 4 MiB.
const limits = { ...DEFAULT_LIMITS, maxMessageBytes: 1 << 16, maxElements: 1 << 20, maxDim: 1 << 20, maxRank: 6 };

const outcomes = new Map<string, number>();
let reassembler = new Reassembler({ maxMessageBytes: 1 << 16, maxOpenStreams: 4 });

function expectOnlyProtocolErrors(fn: () => unknown): void {
  try {
    fn();
    outcomes.set('ok', (outcomes.get('ok') ?? 0) + 1);
  } catch (error) {
    if (!(error instanceof ProtocolError) || !isProtocolErrorCode(error.code)) {
      assert.fail(`decoder threw something other than a ProtocolError: ${error instanceof Error ? error.stack : String(error)}`);
    }
    outcomes.set(error.code, (outcomes.get(error.code) ?? 0) + 1);
  }
}

/** Everything a receiver does with untrusted bytes. */
function receive(bytes: Uint8Array): void {
  const message = decodeEnvelope(bytes, { maxMessageBytes: limits.maxMessageBytes });
  const body = message.body;
  switch (body.case) {
    case 'forward':
    case 'forwardResult':
    case 'backward':
    case 'backwardResult':
      body.value.frames.forEach((frame, i) => decodeTensor(frame, { limits, field: `frames[${i}]` }));
      break;
    case 'hello':
      negotiateVersion(body.value.versions);
      break;
    case 'chunk': {
      const whole = reassembler.accept(body.value);
      if (whole !== null) receive(whole);
      break;
    }
    default:
      break;
  }
}

function receiveFrame(frame: TensorFrame): void {
  decodeTensor(frame, { limits, shape: random() < 0.3 ? [null, 16] : undefined });
}

const CODECS: CodecName[] = ['f32', 'f16', 'bf16', 'int8-block', 'int4-block', 'topk'];
const SPECS: CodecSpec[] = [
  { codec: 'f32' }, { codec: 'f16' }, { codec: 'bf16' }, { codec: 'int8-block', blockSize: 8 }, { codec: 'int4-block', blockSize: 16 },
  { codec: 'topk', topkFraction: 0.2, topkValues: 'f16' }, { codec: 'topk', topkFraction: 0.1, topkValues: 'int8-block', blockSize: 4 },
];

function seedFrames(): TensorFrame[] {
  return SPECS.map((spec, i) => encodeTensor(activationLike(48, i, 16), [3, 16], spec, { name: `t${i}` }));
}

function seedEnvelopes(): Uint8Array[] {
  const dir = new URL('../fixtures/protocol/v1/', import.meta.url);
  const golden = readdirSync(dir).map((name) => new Uint8Array(readFileSync(new URL(name, dir))));
  const frames = seedFrames();
  const step = encodeEnvelope(envelope('req-f', { case: 'forward', value: { sessionId: 's', step: 1, microbatch: 2, needsBackward: true, frames } }));
  return [...golden, step, ...splitMessage(step, 'req-f', 400)];
}

// Varint-heavy garbage: long runs of continuation bits in length and tag positions.
const mutate = byteMutator(random, [(bytes) => {
  const at = int(bytes.length + 1);
  return new Uint8Array([...bytes.subarray(0, at), ...new Array<number>(1 + int(12)).fill(0xff), ...bytes.subarray(at)]);
}]);

function mutateFrame(frame: TensorFrame): TensorFrame {
  const f: TensorFrame = { ...frame, shape: [...frame.shape], params: { ...frame.params } };
  const changes = 1 + int(3);
  for (let c = 0; c < changes; c++) {
    switch (int(9)) {
      case 0: f.shape = Array.from({ length: int(9) }, () => (random() < 0.5 ? int(64) : int(2 ** 32))); break;
      case 1: f.shape[int(f.shape.length)] = random() < 0.5 ? int(2 ** 32) : int(100); break;
      case 2: f.codec = CODECS[int(CODECS.length)]; break;
      case 3: f.params.blockSize = random() < 0.5 ? int(2 ** 32) : int(70); break;
      case 4: f.params.k = random() < 0.5 ? int(2 ** 32) : int(60); break;
      case 5: f.payload = random() < 0.5 ? f.payload.subarray(0, int(f.payload.length + 1)) : randomBytes(int(200)); break;
      case 6: f.params.scales = randomBytes(4 * int(16)); break;
      case 7: f.params.indices = randomBytes(int(20)); break;
      default: f.params.topkValues = random() < 0.5 ? null : random() < 0.5 ? 'f16' : 'int8-block'; break;
    }
  }
  // Mostly with a matching checksum, so the checks behind it are reached.
  f.crc32 = random() < 0.8 ? frameChecksum(f) : int(2 ** 32);
  return f;
}

test('100,000+ random and mutated envelopes and frames: a value or a ProtocolError, bounded memory', { timeout: 180_000 }, () => {
  const envelopes = seedEnvelopes();
  const frames = seedFrames();
  for (const seed of envelopes) expectOnlyProtocolErrors(() => receive(seed));
  const start = process.memoryUsage();
  let peak = 0;
  let cases = 0;
  const sample = () => {
    const m = process.memoryUsage();
    peak = Math.max(peak, m.heapUsed + m.arrayBuffers - start.heapUsed - start.arrayBuffers);
  };

  // Random bytes, half of them behind a valid v1 version so parsing gets past the header.
  for (let i = 0; i < 20_000; i++, cases++) {
    const noise = randomBytes(int(160));
    const bytes = i % 2 === 0 ? noise : new Uint8Array([0x0a, 0x02, 0x08, 0x01, ...noise]);
    expectOnlyProtocolErrors(() => receive(bytes));
  }
  // Mutations of valid envelopes, including chunks (mutated chunk streams exercise the reassembler).
  for (let i = 0; i < 60_000; i++, cases++) {
    const seed = envelopes[int(envelopes.length)];
    const bytes = random() < 0.2 ? mutate(mutate(seed)) : mutate(seed);
    expectOnlyProtocolErrors(() => receive(bytes));
    if (i % 1000 === 0) {
      reassembler = new Reassembler({ maxMessageBytes: 1 << 16, maxOpenStreams: 4 });
      sample();
    }
  }
  // Mutated frames: shapes, codecs, parameters and payloads that disagree with each other.
  for (let i = 0; i < 25_000; i++, cases++) {
    expectOnlyProtocolErrors(() => receiveFrame(mutateFrame(frames[int(frames.length)])));
    if (i % 1000 === 0) sample();
  }
  // Pathological nesting: group starts and nested length prefixes that recurse deeply.
  const deep = [new Uint8Array(200_000).fill(0x0b), new Uint8Array([0x0a, 0x02, 0x08, 0x01, ...new Array<number>(100_000).fill(0x0b)])];
  for (const bytes of deep) {
    cases++;
    expectOnlyProtocolErrors(() => receive(bytes));
  }
  sample();

  console.log(`fuzz: ${cases} cases, outcomes ${JSON.stringify(Object.fromEntries([...outcomes].sort((a, b) => b[1] - a[1])))}, peak growth ${(peak / 2 ** 20).toFixed(1)} MiB`);
  assert.ok(cases >= 100_000);
  assert.ok((outcomes.get('ok') ?? 0) > 1000, 'some mutations still decode: the fuzzer reaches past the first check');
  assert.ok(outcomes.size >= 12, 'many different refusals are reached');
  assert.ok(peak < 256 * 2 ** 20, `memory grew by ${peak} bytes`);
});
