// Joining a federation (`tandem edge federate`): for every round this owner is sampled for,
// take the global adapter, train it with the one training run, and send the delta (clipped
// to the federation's norm under DP). The federation's mode decides where the middle runs:
// split, through the cloud's middle blocks in a session of the round (the edge part is
// downloaded once); offsite, on a model folder the owner holds (the emulated model of an
// emulator bundle). FedProx's proximal term and FFA-LoRA's frozen A come with the round.
// The owner's data never leaves this process; only the update (and, split, activations) do.
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DEFAULT_RECIPE, LlamaModel, SecAggOwner, addGaussianNoise, checkRun, clipUpdate, constrainLocalRound, initBackend, splitNoiseStd,
  MAX_ADAPTER_TENSORS, checkTokenizerFits, loadModelFolder, loadTokenizer, openRun, readSafetensorsFile, runSteps, toFloat32, writeSafetensorsFile,
} from '../model/index.ts';
import type { Cut, Evaluation, Middle, TextTokenizer, TrainRecipe, TrainingResult, TrainingSpec } from '../model/index.ts';
import { decodeFloat32, encodeFloat32, encodeUint32 } from '../protocol/index.ts';
import type { CodecName, FederationCreate, FederationStatus, RoundAssignment, RoundUpdate, RoundUpdateAck, SecAggPhase, SecAggView, WireAdapter } from '../protocol/index.ts';
import { call } from './cloud-call.ts';
import type { CloudTarget } from './cloud-call.ts';
import { loadEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import { connectCloud } from './session.ts';

export interface FederateOptions {
  cloud: string;
  key: string;
  /** PEM CA certificate(s) for an https:// cloud with a private CA. */
  ca?: string;
  federation: string;
  /** The owner's data file. */
  data: string;
  /** The model folder local training runs on (the emulated model in offsite mode); split mode downloads the edge part instead. */
  modelDir?: string;
  /** Split mode: the codec of activations and gradients, each way (f32 by default). */
  codec?: CodecName;
  /** Split mode: where the edge part is cached (under workDir by default). */
  cacheDir?: string;
  /** Scratch folder for the global adapter of each round. */
  workDir: string;
  recipe?: Partial<Omit<TrainRecipe, 'steps'>>;
  /** How often to ask for the next round. */
  pollMs?: number;
  /** Give up after the cloud has been unreachable (it may be restarting) or the federation unknown (not created yet) this long. */
  unreachableMs?: number;
  /** Stop after this many submitted rounds (all rounds by default). */
  maxRounds?: number;
  /** Called once the model is loaded, before the first request. */
  onReady?: () => unknown;
  /** Called when local training of a round starts. */
  onTraining?: (round: number, attempt: number) => unknown;
  onRound?: (event: FederateRoundEvent) => unknown;
  backend?: string;
}

export interface FederateRoundEvent {
  round: number;
  attempt: number;
  loss: number;
  examples: number;
  validation?: Evaluation;
  updateBytes: number;
  /** The update sent (the delta, clipped under DP): the owner's own, for its records. */
  update: Float32Array;
  ack?: RoundUpdateAck;
  /** Seconds spent in secure aggregation (key agreement, sharing, masking, reveal), waits for other owners included. */
  secaggSeconds?: number;
  /** The cloud's code when it refused the update (e.g. the round moved on). */
  refused?: string;
}

export interface FederateResult {
  rounds: FederateRoundEvent[];
  state: RoundAssignment['state'];
}

class Rest {
  constructor(private readonly target: CloudTarget) {}

  async call<T>(method: 'GET' | 'POST', path: string, body?: unknown): Promise<T> {
    const res = await call(this.target, method, path, body, 120_000);
    const text = await res.text();
    try {
      return JSON.parse(text) as T;
    } catch (cause) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the body is not JSON', { where: `${this.target.cloudUrl}${path}`, cause });
    }
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A PEFT adapter folder on the wire (adapter_config.json's text and its tensors as float32). */
export async function readAdapterFolder(dir: string): Promise<WireAdapter> {
  const config = await readFile(join(dir, ADAPTER_CONFIG_FILE), 'utf8').catch((cause: unknown) => {
    throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `cannot read ${ADAPTER_CONFIG_FILE}: ${(cause as Error).message}`, { field: 'adapter', where: dir, cause });
  });
  const file = join(dir, ADAPTER_WEIGHTS_FILE);
  const weights = await readSafetensorsFile(file, { maxTensors: MAX_ADAPTER_TENSORS });
  const tensors: WireAdapter['tensors'] = {};
  for (const [k, t] of [...weights.tensors].sort(([a], [b]) => (a < b ? -1 : 1))) tensors[k] = { shape: [...t.shape], data: encodeFloat32(Float32Array.from(toFloat32(t, file, k))) };
  return { config, tensors };
}

/** Writes a wire adapter as a PEFT folder. */
export async function writeAdapterFolder(adapter: WireAdapter, dir: string): Promise<void> {
  await writeGlobal(adapter, dir);
}

/** The admin's side of the federations REST API. */
export class FederationAdmin {
  readonly #rest: Rest;

  constructor(cloud: string, key: string) {
    this.#rest = new Rest({ cloudUrl: cloud, key });
  }

  create(body: FederationCreate): Promise<FederationStatus> {
    return this.#rest.call('POST', '/v1/federations', body);
  }

  status(id: string): Promise<FederationStatus> {
    return this.#rest.call('GET', `/v1/federations/${encodeURIComponent(id)}`);
  }

  adapter(id: string): Promise<WireAdapter> {
    return this.#rest.call('GET', `/v1/federations/${encodeURIComponent(id)}/adapter`);
  }
}

/** The global adapter as a PEFT folder; returns its tensors flat in sorted-key order. */
async function writeGlobal(adapter: WireAdapter, dir: string): Promise<{ keys: string[]; flat: Float32Array }> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const keys = Object.keys(adapter.tensors).sort();
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  const parts: Float32Array[] = [];
  for (const k of keys) {
    const data = decodeFloat32(adapter.tensors[k].data);
    if (data === null) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `global adapter tensor ${k} is not base64 float32`, { field: k });
    tensors[k] = { dtype: 'F32', shape: adapter.tensors[k].shape, data };
    parts.push(data);
  }
  await writeFile(join(dir, ADAPTER_CONFIG_FILE), adapter.config);
  await writeSafetensorsFile(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: 'pt' });
  const flat = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    flat.set(p, o);
    o += p.length;
  }
  return { keys, flat };
}

/** Values in the global adapter of an assignment. */
function global0(a: RoundAssignment): number {
  return Object.values(a.adapter!.tensors).reduce((s, t) => s + t.shape.reduce((x, y) => x * y, 1), 0);
}

const PHASES: SecAggPhase[] = ['keys', 'shares', 'masked', 'reveal'];

/** Polls the round's secure aggregation until it reaches `phase` (a later round or attempt answers with a typed error). */
async function waitPhase(rest: Rest, base: string, phase: SecAggPhase, pollMs: number): Promise<SecAggView> {
  for (;;) {
    const view = await rest.call<SecAggView>('GET', `${base}/secagg`);
    if (PHASES.indexOf(view.phase) >= PHASES.indexOf(phase)) return view;
    await sleep(Math.min(pollMs, 100));
  }
}

/** SecAgg steps 1 and 2 before local training: keys, then Shamir shares of the seeds, so a later dropout is recoverable. */
async function startSecAgg(rest: Rest, base: string, a: RoundAssignment, length: number, pollMs: number): Promise<{ owner: SecAggOwner; seconds: number }> {
  const t0 = performance.now();
  const first = await rest.call<SecAggView>('GET', `${base}/secagg`);
  const owner = new SecAggOwner(a.owner, { round: first.label, length, threshold: first.threshold, owners: first.sampled.length });
  await rest.call('POST', `${base}/secagg/keys`, { attempt: a.attempt, ...owner.advertise() });
  const view = await waitPhase(rest, base, 'shares', pollMs);
  await rest.call('POST', `${base}/secagg/shares`, { attempt: a.attempt, shares: owner.shareKeys(view.advertised) });
  return { owner, seconds: (performance.now() - t0) / 1000 };
}

/** What a round trains on: the model the edge holds and, split, the cloud's middle for the round. */
interface RoundModel {
  model: LlamaModel;
  tokenizer: TextTokenizer;
  modelHash: string;
  baseModel: string;
  cut?: Cut;
  /** Split: a session of the round, whose middle is the cloud's; closed after the round. */
  session?: () => Promise<{ middle: Middle; close: () => Promise<void> }>;
  dispose: () => void;
}

/** The edge part of the model at the federation's cut, downloaded once; each round opens its own session. */
async function splitModel(options: FederateOptions, a: RoundAssignment): Promise<RoundModel> {
  const connect = () => connectCloud(options.cloud, { key: options.key, ca: options.ca });
  const client = await connect();
  try {
    const info = (await client.models()).find((m) => m.id === a.model);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(a.model)}`, { field: 'model' });
    const cut = a.cut ?? info.defaultCut;
    const edge = await loadEdgePart(await client.downloadEdge(info.id, cut, options.cacheDir ?? join(options.workDir, 'cache')));
    const codec = { codec: options.codec ?? ('f32' as const) };
    return {
      model: edge.model, tokenizer: edge.tokenizer, modelHash: edge.contentHash, baseModel: info.id, cut,
      session: async () => {
        const c = await connect();
        try {
          const session = await c.openSession({ model: { id: info.id, contentHash: edge.contentHash }, cut, codecs: { forward: [codec], backward: [codec] } });
          const middle = session.middle();
          return {
            middle, close: async () => {
              middle.dispose();
              await session.close('completed').finally(() => c.close());
            },
          };
        } catch (error) {
          c.close();
          throw error;
        }
      },
      dispose: () => edge.model.dispose(),
    };
  } finally {
    client.close();
  }
}

/** One round's local training from the global adapter in `adapterDir`, under the round's FedProx μ and FFA-LoRA. */
async function trainRound(m: RoundModel, a: RoundAssignment, options: FederateOptions, adapterDir: string, onStart: (trainRows: number) => void): Promise<TrainingResult> {
  const spec: TrainingSpec = {
    model: m.model, tokenizer: m.tokenizer, modelHash: m.modelHash, dataFile: options.data, baseModel: m.baseModel,
    recipe: { ...DEFAULT_RECIPE, ...options.recipe, steps: a.localSteps, seed: (options.recipe?.seed ?? 0) + a.round * 1009 + a.attempt },
    methods: [], adapterDir, evaluate: true, ...(m.cut ? { cut: m.cut } : {}),
    onEvent: (e) => {
      if (e.type === 'start') onStart(e.trainRows);
    },
  };
  checkRun(spec.recipe, spec);
  const remote = await m.session?.();
  if (remote) spec.middle = remote.middle;
  try {
    const state = await openRun(spec);
    const undo = constrainLocalRound(state.adapter, { fedproxMu: a.fedproxMu, freezeLoraA: a.aggregation === 'ffa-lora' });
    try {
      return await runSteps(state, spec);
    } finally {
      undo();
      state.optimizer.dispose();
      state.adapter.dispose();
    }
  } finally {
    await remote?.close();
  }
}

/** Takes part in every round this owner is sampled for, until the federation is done. */
export async function federate(options: FederateOptions): Promise<FederateResult> {
  const rest = new Rest({ cloudUrl: options.cloud, key: options.key, ca: options.ca });
  const pollMs = options.pollMs ?? 500;
  const unreachableMs = options.unreachableMs ?? 120_000;
  await initBackend({ backend: options.backend });
  let local: RoundModel | undefined;
  if (options.modelDir !== undefined) {
    const [loaded, tokenizer] = await Promise.all([loadModelFolder(options.modelDir), loadTokenizer(options.modelDir)]);
    checkTokenizerFits(tokenizer, loaded.config.vocabSize);
    const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
    local = { model, tokenizer, modelHash: loaded.contentHash, baseModel: options.modelDir, dispose: () => model.dispose?.() };
  }
  let split: RoundModel | undefined;
  await options.onReady?.();
  const rounds: FederateRoundEvent[] = [];
  let unreachableSince: number | undefined;
  try {
    for (;;) {
      let a: RoundAssignment;
      try {
        a = await rest.call<RoundAssignment>('GET', `/v1/federations/${encodeURIComponent(options.federation)}/round`);
        unreachableSince = undefined;
      } catch (error) {
        // The cloud restarting, or the federation not created yet: wait, up to unreachableMs.
        if (error instanceof EdgeError && (error.code === 'TANDEM_EDGE_HTTP_FAILED' || error.remoteCode === 'TANDEM_FED_UNKNOWN')) {
          unreachableSince ??= Date.now();
          if (Date.now() - unreachableSince > unreachableMs) throw error;
          await sleep(pollMs);
          continue;
        }
        throw error;
      }
      if (a.state !== 'open') return { rounds, state: a.state };
      if (!a.sampled || a.submitted || a.adapter === undefined) {
        await sleep(pollMs);
        continue;
      }
      const base = `/v1/federations/${encodeURIComponent(options.federation)}/rounds/${a.round}`;
      const event = await (async (): Promise<FederateRoundEvent> => {
        const m = a.mode === 'split' ? (split ??= await splitModel(options, a)) : local;
        if (!m) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'the federation trains offsite: give the model folder to train on', { field: 'modelDir' });
        const secure = a.secureAggregation ? await startSecAgg(rest, base, a, global0(a), pollMs) : undefined;
        await options.onTraining?.(a.round, a.attempt);
        const dir = join(options.workDir, `round-${a.round}-${a.attempt}`);
        const global = await writeGlobal(a.adapter!, join(dir, 'global'));
        let trainRows = 0;
        const result = await trainRound(m, a, options, join(dir, 'global'), (rows) => (trainRows = rows)).finally(() => rm(dir, { recursive: true, force: true }));
        const delta = new Float32Array(global.flat.length);
        let o = 0;
        for (const k of global.keys) {
          const t = result.adapter.get(k);
          if (!t) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the trained adapter lacks tensor ${k} of the global adapter`, { field: k });
          for (let i = 0; i < t.data.length; i++) delta[o + i] = t.data[i] - global.flat[o + i];
          o += t.data.length;
        }
        if (a.dp) clipUpdate(delta, a.dp.clipNorm);
        const loss = result.losses.length ? result.losses.reduce((s, l) => s + l, 0) / result.losses.length : 0;
        const examples = Math.max(1, trainRows);
        const body: RoundUpdate = { attempt: a.attempt, examples, loss };
        if (result.after) body.validation = { loss: result.after.loss, ...(result.after.accuracy === undefined ? {} : { accuracy: result.after.accuracy }) };
        const ev: FederateRoundEvent = { round: a.round, attempt: a.attempt, loss, examples, validation: result.after, updateBytes: delta.byteLength, update: delta };
        try {
          if (secure) {
            const t0 = performance.now();
            // The sum the cloud learns is Σ examples·delta (Σ delta under DP, each owner adding its share of the noise).
            const input = Float32Array.from(delta, (v) => (a.dp ? v : v * examples));
            if (a.dp) addGaussianNoise(input, splitNoiseStd(a.dp.noiseMultiplier, a.dp.clipNorm, a.sampledOwners.length));
            const view = await waitPhase(rest, base, 'masked', pollMs);
            body.masked = encodeUint32(secure.owner.maskInput(input, view.shares));
            ev.ack = await rest.call<RoundUpdateAck>('POST', `${base}/updates`, body);
            const reveal = await waitPhase(rest, base, 'reveal', pollMs);
            await rest.call('POST', `${base}/secagg/reveal`, { attempt: a.attempt, ...secure.owner.reveal(reveal.survivors) });
            ev.secaggSeconds = secure.seconds + (performance.now() - t0) / 1000;
          } else {
            body.values = encodeFloat32(delta);
            ev.ack = await rest.call<RoundUpdateAck>('POST', `${base}/updates`, body);
          }
        } catch (error) {
          if (!(error instanceof EdgeError) || error.remoteCode === undefined) throw error;
          ev.refused = error.remoteCode; // the round moved on (late) or it was already in (replay): ask again
        }
        return ev;
      })().catch((error: unknown) => {
        if (error instanceof EdgeError && error.remoteCode !== undefined) return { round: a.round, attempt: a.attempt, loss: NaN, examples: 0, updateBytes: 0, update: new Float32Array(0), refused: error.remoteCode };
        throw error;
      });
      rounds.push(event);
      await options.onRound?.(event);
      if (event.refused) await sleep(pollMs);
      if (options.maxRounds !== undefined && rounds.filter((r) => r.ack).length >= options.maxRounds) return { rounds, state: 'open' };
    }
  } finally {
    local?.dispose();
    split?.dispose();
  }
}
