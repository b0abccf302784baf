// Codec throughput on 16 MB of activation-like float32 data, single thread.
// Prints, per codec: encode and decode GB/s (input float32 bytes / time) of the codec alone
// and of the whole frame (with crc32 and validation), compression ratio, max and RMS error;
// plus memcpy and crc32 GB/s measured in the same run. Measures; asserts nothing.
// Run: node --import tsx bench/codecs.ts   (or npm run bench -- codecs)
import { mkdirSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { crc32, decodeTensor, encodeTensor, frameBytes } from '../protocol/index.ts';
import type { CodecSpec } from '../protocol/index.ts';
import { CODECS } from '../protocol/codecs/registry.ts';
import { activationLike } from '../test/fixtures/protocol/activations.ts';

const ELEMENTS = 4 * 1024 * 1024; // 16 MB of float32
const HIDDEN = 4096;
const BYTES = ELEMENTS * 4;
const REPEATS = 7;

const SPECS: { label: string; spec: CodecSpec }[] = [
  { label: 'f32', spec: { codec: 'f32' } },
  { label: 'f16', spec: { codec: 'f16' } },
  { label: 'bf16', spec: { codec: 'bf16' } },
  { label: 'int8-block/64', spec: { codec: 'int8-block', blockSize: 64 } },
  { label: 'int4-block/64', spec: { codec: 'int4-block', blockSize: 64 } },
  { label: 'topk 1% f16', spec: { codec: 'topk', topkFraction: 0.01, topkValues: 'f16' } },
  { label: 'topk 1% int8', spec: { codec: 'topk', topkFraction: 0.01, topkValues: 'int8-block', blockSize: 64 } },
];

interface Timing {
  /** Median wall-clock seconds. */
  wall: number;
  /** Median CPU seconds of this process: closer to the unloaded figure on a shared machine. */
  cpu: number;
}

/** Medians of `repeats` runs after two warm-up runs. */
function time(fn: () => void, repeats = REPEATS): Timing {
  fn();
  fn();
  const walls: number[] = [];
  const cpus: number[] = [];
  for (let r = 0; r < repeats; r++) {
    const cpu = process.cpuUsage();
    const start = performance.now();
    fn();
    walls.push((performance.now() - start) / 1000);
    const used = process.cpuUsage(cpu);
    cpus.push((used.user + used.system) / 1e6);
  }
  const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1];
  return { wall: median(walls), cpu: median(cpus) };
}

const gbps = (seconds: number): number => BYTES / 1e9 / Math.max(seconds, 1e-6);
const round = (x: number, digits = 3): number => Number(x.toPrecision(digits));

export interface CodecResult {
  codec: string;
  encodeGBps: number;
  decodeGBps: number;
  encodeCpuGBps: number;
  decodeCpuGBps: number;
  frameEncodeGBps: number;
  frameDecodeGBps: number;
  compressionRatio: number;
  maxAbsError: number;
  rmsError: number;
}

async function measureCodecs(): Promise<Record<string, unknown>> {
  const data = activationLike(ELEMENTS, 1, HIDDEN);
  const copy = new Float32Array(ELEMENTS);
  const memcpyGBps = gbps(time(() => copy.set(data)).wall);
  const dataBytes = new Uint8Array(data.buffer);
  const crc32GBps = gbps(time(() => crc32(dataBytes), 3).wall);
  const shape = [ELEMENTS / HIDDEN, HIDDEN];

  const results: CodecResult[] = [];
  for (const { label, spec } of SPECS) {
    const codec = CODECS[spec.codec];
    const context = { allowNonFinite: false };
    let encoded = codec.encode(data, spec, context);
    const encodeSeconds = time(() => {
      encoded = codec.encode(data, spec, context);
    });
    const frame = encodeTensor(data, shape, spec);
    const out = new Float32Array(ELEMENTS);
    const decodeSeconds = time(() => {
      // Top-k writes only the kept elements: it needs a zeroed output, as decodeTensor allocates.
      if (spec.codec === 'topk') out.fill(0);
      codec.decodeInto({ ...frame, payload: encoded.payload, params: encoded.params }, out, label);
    });
    const frameEncodeSeconds = time(() => encodeTensor(data, shape, spec), 3);
    let decoded: Float32Array = new Float32Array(0);
    const frameDecodeSeconds = time(() => {
      decoded = decodeTensor(frame, { shape, limits: { maxFrameBytes: 2 ** 31, maxMessageBytes: 2 ** 31, maxRank: 4, maxDim: 1 << 24, maxElements: 1 << 26 } });
    }, 3);
    let maxAbs = 0;
    let squares = 0;
    for (let i = 0; i < ELEMENTS; i++) {
      const e = Math.abs(decoded[i] - data[i]);
      if (e > maxAbs) maxAbs = e;
      squares += e * e;
    }
    results.push({
      codec: label,
      encodeGBps: round(gbps(encodeSeconds.wall)),
      decodeGBps: round(gbps(decodeSeconds.wall)),
      encodeCpuGBps: round(gbps(encodeSeconds.cpu)),
      decodeCpuGBps: round(gbps(decodeSeconds.cpu)),
      frameEncodeGBps: round(gbps(frameEncodeSeconds.wall)),
      frameDecodeGBps: round(gbps(frameDecodeSeconds.wall)),
      compressionRatio: round(BYTES / frameBytes(frame)),
      maxAbsError: round(maxAbs),
      rmsError: round(Math.sqrt(squares / ELEMENTS)),
    });
  }
  let absMax = 0;
  for (let i = 0; i < ELEMENTS; i++) absMax = Math.max(absMax, Math.abs(data[i]));
  return {
    data: { elements: ELEMENTS, bytes: BYTES, shape, kind: 'Student-t (3 dof) x 0.5, 0.5% of channels x20-100', absMax: round(absMax) },
    node: process.version,
    // On a shared machine the wall-clock figures depend on what else runs.
    loadAverage: loadavg().map((x) => round(x, 2)),
    memcpyGBps: round(memcpyGBps),
    crc32GBps: round(crc32GBps),
    codecs: results,
  };
}

export function formatTable(result: Record<string, unknown>): string {
  const rows = result.codecs as CodecResult[];
  const header = ['codec', 'enc GB/s', 'dec GB/s', 'enc (cpu)', 'dec (cpu)', 'frame enc', 'frame dec', 'ratio', 'max |err|', 'rms err'];
  const lines = rows.map((r) => [
    r.codec, r.encodeGBps, r.decodeGBps, r.encodeCpuGBps, r.decodeCpuGBps, r.frameEncodeGBps, r.frameDecodeGBps, `${r.compressionRatio}x`, r.maxAbsError, r.rmsError,
  ].map(String));
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i].length)));
  const format = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  return [
    `16 MB activation-like float32 (${JSON.stringify(result.data)}), ${String(result.node)}, one thread`,
    `memcpy ${String(result.memcpyGBps)} GB/s   crc32 ${String(result.crc32GBps)} GB/s   load average ${String(result.loadAverage)}`,
    'GB/s = input float32 bytes / median time; (cpu) = per CPU second of this process; frame = codec + crc32 + validation + allocation',
    format(header),
    ...lines.map(format),
  ].join('\n');
}

/** Measures, prints the table and returns the figures (bench/run.ts writes them as JSON). */
export async function run(): Promise<Record<string, unknown>> {
  const result = await measureCodecs();
  console.log(formatTable(result));
  return result;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const result = await run();
  const dir = fileURLToPath(new URL('./results/', import.meta.url));
  mkdirSync(dir, { recursive: true });
  writeFileSync(`${dir}codecs.json`, `${JSON.stringify(result, null, 2)}\n`);
  console.log(`wrote ${dir}codecs.json`);
}
