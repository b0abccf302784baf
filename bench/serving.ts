// Adapter serving through a real node's OpenAI API on loopback: 32 requests over 8 adapters
// at once ("mixed"), 32 on one adapter at once ("single"), and the same 32 one after another
// ("sequential"). Tokens/s, time to first token p50/p99 and deadline miss rate, every request
// arriving at the scenario's start (so a sequential request's TTFT includes its wait).
// `npm run bench -- serving [--quick] [--tokens N] [--deadline-ms D] [--engine E]`: the ~25M random
// Llama of bench/split.ts (8 blocks, hidden 512) by default; --quick: stories260K. 48 tokens per
// request (with 16 a scenario lasted 0.3 s and mixed/single read 0.70, 0.80 and 0.95 in three
// runs on a quiet machine; with 48, 0.95 and 0.87). --engine: ort-cpu (default; the node's
// batched steps on ONNX Runtime) or tfjs. --repeat R (5): the three scenarios run R times,
// interleaved, and each row is the run of median tokens/s, so that a burst of load from other
// processes skews one run, not a ratio.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCloudNode } from '../cloud-node/index.ts';
import type { CloudNode } from '../cloud-node/index.ts';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, createAdapter, initBackend, LlamaModel, loadModelFolder, saveAdapter } from '../model/index.ts';
import { randomModelDir } from './_random-model.ts';

const FIXTURE = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');
const REQUESTS = 32;
const ADAPTERS = 8;
const PROMPTS = ['Once upon a time', 'The little dog ran to the park and', 'Lily', 'One day, a girl named Sue went to the park with her mom and saw', 'Tom had a red ball', 'The sun was hot'];

interface Row {
  scenario: 'mixed' | 'single' | 'sequential';
  requests: number;
  adapters: number;
  tokensPerSecond: number;
  ttftP50Seconds: number;
  ttftP99Seconds: number;
  deadlineMissRate: number;
  seconds: number;
  tokens: number;
}


function quantile(values: number[], q: number): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))];
}

async function post(node: CloudNode, key: string, path: string, body: unknown): Promise<Record<string, unknown>> {
  const r = await fetch(`${node.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = (await r.json()) as Record<string, unknown>;
  if (r.status >= 300) throw new Error(`${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

export async function run(args: string[]): Promise<Record<string, unknown>> {
  const quick = args.includes('--quick');
  const flag = (name: string, fallback: number): number => {
    const at = args.indexOf(name);
    return at >= 0 ? Number(args[at + 1]) : fallback;
  };
  const maxTokens = flag('--tokens', 48);
  const repeat = flag('--repeat', 5);
  if (!Number.isInteger(repeat) || repeat < 1 || repeat > 20) throw new Error(`--repeat must be an integer in [1, 20], got ${repeat}`);
  const deadlineMs = flag('--deadline-ms', quick ? 5000 : 30000);
  const engineAt = args.indexOf('--engine');
  const engine = engineAt >= 0 ? args[engineAt + 1] : 'ort-cpu';
  if (engine !== 'ort-cpu' && engine !== 'ort-cuda' && engine !== 'tfjs') throw new Error(`--engine must be ort-cpu, ort-cuda or tfjs, got ${engine}`);
  const backend = await initBackend({ log: (line) => process.stdout.write(`${line}\n`) });
  const work = await mkdtemp(join(tmpdir(), 'tandem-bench-serving-'));
  try {
    const modelDir = quick ? FIXTURE : await randomModelDir(work);
    const modelName = quick ? 'stories260K' : 'random Llama ~25M (8 blocks, hidden 512)';
    const loaded = await loadModelFolder(modelDir);
    const base = LlamaModel.fromArrays(loaded.config, loaded.weights);
    const adapterDirs: string[] = [];
    for (let i = 0; i < ADAPTERS; i++) {
      const adapter = createAdapter(base, [{ method: 'lora', r: 8, loraAlpha: 16, initLoraWeights: false, targetModules: ['q_proj', 'v_proj', 'o_proj'] }], { seed: 100 + i });
      const dir = join(work, `adapter-${i}`);
      await saveAdapter(adapter, dir);
      adapter.dispose();
      adapterDirs.push(dir);
    }
    base.dispose();
    const node = await startCloudNode({ modelDir, modelId: 'base', stateDir: join(work, 'state'), logLevel: 'error', backend: backend.name, ...(engine === 'tfjs' ? {} : { engine }), serving: { maxBatch: REQUESTS, residentAdapters: ADAPTERS } });
    const runs: Row[] = [];
    try {
      const key = node.adminKey as string;
      const contentHash = ((await (await fetch(`${node.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } })).json()) as { models: { contentHash: string }[] }).models[0].contentHash;
      for (const [i, dir] of adapterDirs.entries()) {
        // As multipart/form-data: the files as they are (a JSON body is at most 4 MiB).
        const form = new FormData();
        form.append('name', `a${i}`);
        form.append('baseContentHash', contentHash);
        form.append('config', new Blob([await readFile(join(dir, ADAPTER_CONFIG_FILE))]), ADAPTER_CONFIG_FILE);
        form.append('weights', new Blob([await readFile(join(dir, ADAPTER_WEIGHTS_FILE))]), ADAPTER_WEIGHTS_FILE);
        const uploaded = await fetch(`${node.url}/v1/adapters`, { method: 'POST', headers: { authorization: `Bearer ${key}` }, body: form });
        if (uploaded.status !== 201) throw new Error(`/v1/adapters: ${uploaded.status} ${await uploaded.text()}`);
      }
      const body = (i: number, adapter: number) => ({ model: `base:a${adapter}`, prompt: PROMPTS[i % PROMPTS.length], max_tokens: maxTokens, temperature: 0, ignore_eos: true, deadline_ms: deadlineMs });
      // Warm-up, also before each scenario: every adapter resident, the kernels compiled, and
      // REQUESTS connections open in the client's pool. Otherwise a scenario that follows the
      // sequential one (whose idle connections the server closed after its keep-alive timeout)
      // pays for reconnecting, which the node's event loop serves only between steps.
      const warmUp = () => Promise.all(Array.from({ length: REQUESTS }, (_, i) => post(node, key, '/v1/completions', { ...body(i, i % ADAPTERS), max_tokens: 2 })));
      await warmUp();
      // Steps so far on the node's engine: their count, rows and seconds (GET /metrics).
      const steps = async (): Promise<{ count: number; rows: number; seconds: number }> => {
        const text = await (await fetch(`${node.url}/metrics`)).text();
        const value = (name: string): number => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
        return { count: value('tandem_serve_step_seconds_count'), rows: value('tandem_serve_batch_rows_sum'), seconds: value('tandem_serve_step_seconds_sum') };
      };
      const scenario = async (name: Row['scenario'], adapterOf: (i: number) => number, sequential: boolean): Promise<void> => {
        await warmUp();
        const before = await steps();
        const t0 = performance.now();
        const one = async (i: number): Promise<{ ttft: number; finished: number; tokens: number }> => {
          const sent = performance.now();
          const json = await post(node, key, '/v1/completions', body(i, adapterOf(i)));
          const choice = (json.choices as { token_ids: number[]; time_to_first_token_seconds: number }[])[0];
          return { ttft: (sent - t0) / 1000 + choice.time_to_first_token_seconds, finished: (performance.now() - t0) / 1000, tokens: choice.token_ids.length };
        };
        const results: { ttft: number; finished: number; tokens: number }[] = [];
        if (sequential) for (let i = 0; i < REQUESTS; i++) results.push(await one(i));
        else results.push(...(await Promise.all(Array.from({ length: REQUESTS }, (_, i) => one(i)))));
        const seconds = (performance.now() - t0) / 1000;
        const after = await steps();
        const tokens = results.reduce((n, r) => n + r.tokens, 0);
        const ttfts = results.map((r) => r.ttft);
        const row: Row = {
          scenario: name, requests: REQUESTS, adapters: new Set(Array.from({ length: REQUESTS }, (_, i) => adapterOf(i))).size,
          tokensPerSecond: tokens / seconds, ttftP50Seconds: quantile(ttfts, 0.5), ttftP99Seconds: quantile(ttfts, 0.99),
          deadlineMissRate: results.filter((r) => r.finished * 1000 > deadlineMs).length / REQUESTS, seconds, tokens,
        };
        runs.push(row);
        process.stdout.write(`${name.padEnd(10)} ${row.adapters} adapters  ${row.tokensPerSecond.toFixed(1).padStart(8)} tokens/s  TTFT p50 ${row.ttftP50Seconds.toFixed(3)} s  p99 ${row.ttftP99Seconds.toFixed(3)} s  deadline misses ${(100 * row.deadlineMissRate).toFixed(0)}%  (${tokens} tokens in ${seconds.toFixed(2)} s; ${after.count - before.count} steps of ${((after.rows - before.rows) / (after.count - before.count)).toFixed(1)} rows, ${(after.seconds - before.seconds).toFixed(2)} s in them)\n`);
      };
      process.stdout.write(`model: ${modelName}; engine ${engine} (tfjs backend ${backend.name}); ${REQUESTS} requests of ${maxTokens} tokens; deadline ${deadlineMs} ms from the scenario's start\n`);
      for (let r = 0; r < repeat; r++) {
        await scenario('mixed', (i) => i % ADAPTERS, false);
        await scenario('single', () => 0, false);
        await scenario('sequential', (i) => i % ADAPTERS, true);
      }
    } finally {
      await node.close();
    }
    const rows = (['mixed', 'single', 'sequential'] as const).map((name) => {
      const of = runs.filter((r) => r.scenario === name).sort((a, b) => a.tokensPerSecond - b.tokensPerSecond);
      return of[Math.floor((of.length - 1) / 2)];
    });
    if (repeat > 1) process.stdout.write(`medians of ${repeat} runs:\n${rows.map((r) => `${r.scenario.padEnd(10)} ${r.tokensPerSecond.toFixed(1).padStart(8)} tokens/s  TTFT p50 ${r.ttftP50Seconds.toFixed(3)} s  p99 ${r.ttftP99Seconds.toFixed(3)} s`).join('\n')}\n`);
    const of = (s: Row['scenario']) => rows.find((r) => r.scenario === s)?.tokensPerSecond ?? NaN;
    const mixedOverSingle = of('mixed') / of('single');
    const mixedOverSequential = of('mixed') / of('sequential');
    process.stdout.write(`mixed / single ${mixedOverSingle.toFixed(2)}x (target >= 0.8x); mixed / sequential ${mixedOverSequential.toFixed(2)}x (target >= 4x)\n`);
    return { model: modelName, engine, backend: backend.name, repeat, maxTokens, deadlineMs, rows, mixedOverSingle, mixedOverSequential };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
