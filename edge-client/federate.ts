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
import { SECAGG_PHASES, encodeFloat32, encodeUint32 } from '../protocol/index.ts';
import type { CodecName, FederationCreate, FederationStatus, RoundAssignment, RoundUpdate, RoundUpdateAck, SecAggPhase, SecAggView, WireAdapter } from '../protocol/index.ts';
import { MAX_JSON_REPLY_BYTES, readJson } from './reply-body.ts';
import { call, cloudUrl } from './cloud-call.ts';
import type { CloudTarget } from './cloud-call.ts';
import { loadEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import {
  Fields, GLOBAL_METADATA, MAX_ROUND_REPLY_BYTES, MAX_STATUS_REPLY_BYTES, SECAGG_VIEW_BYTES_PER_OWNER, checkGlobalFits, decodeGlobal, parseAck, parseAssignment, parseSecAggView,
  parseStatus, parseWireAdapter, toWire,
} from './federation-replies.ts';
import type { DecodedAdapter, Round } from './federation-replies.ts';
import { chooseCut } from './proposed-cut.ts';
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
  /**
   * What ended this attempt without an update taken: the cloud's code when it refused it (e.g.
   * TANDEM_FED_UPDATE_LATE), or TANDEM_EDGE_ROUND_MOVED_ON when this owner saw secure
   * aggregation at a later round or attempt.
   */
  refused?: string;
}

export interface FederateResult {
  rounds: FederateRoundEvent[];
  state: RoundAssignment['state'];
}

class Rest {
  constructor(private readonly target: CloudTarget) {}

  where(path: string): string {
    return cloudUrl(this.target, path);
  }

  /** The reply's JSON, read no further than `limit` bytes; what it holds is for the caller to check. */
  async call(method: 'GET' | 'POST', path: string, body?: unknown, limit = MAX_JSON_REPLY_BYTES): Promise<unknown> {
    return readJson(await call(this.target, method, path, body, 120_000), this.where(path), limit);
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

/** Writes a wire adapter (the cloud's global adapter, say) as a PEFT folder, its structure and values checked first. */
export async function writeAdapterFolder(adapter: WireAdapter, dir: string): Promise<void> {
  const where = 'the adapter to write';
  const checked = parseWireAdapter(adapter, new Fields(where), 'adapter');
  await writeGlobal(checked.config, decodeGlobal(checked, where), dir);
}

/** The admin's side of the federations REST API. */
export class FederationAdmin {
  readonly #rest: Rest;

  constructor(cloud: string, key: string) {
    this.#rest = new Rest({ cloudUrl: cloud, key });
  }

  async create(body: FederationCreate): Promise<FederationStatus> {
    const path = '/v1/federations';
    return parseStatus(await this.#rest.call('POST', path, body, MAX_STATUS_REPLY_BYTES), this.#rest.where(path));
  }

  async status(id: string): Promise<FederationStatus> {
    const path = `/v1/federations/${encodeURIComponent(id)}`;
    return parseStatus(await this.#rest.call('GET', path, undefined, MAX_STATUS_REPLY_BYTES), this.#rest.where(path));
  }

  async adapter(id: string): Promise<WireAdapter> {
    const path = `/v1/federations/${encodeURIComponent(id)}/adapter`;
    return toWire(parseWireAdapter(await this.#rest.call('GET', path, undefined, MAX_ROUND_REPLY_BYTES), new Fields(this.#rest.where(path)), 'adapter'));
  }
}

/** The global adapter, decoded, as a PEFT folder. */
async function writeGlobal(config: string, decoded: DecodedAdapter, dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, ADAPTER_CONFIG_FILE), config);
  await writeSafetensorsFile(join(dir, ADAPTER_WEIGHTS_FILE), decoded.tensors, GLOBAL_METADATA);
}

/**
 * The round's secure aggregation as the cloud shows it. A view of another round or attempt is the
 * round moving on (the cloud answers a later round's view with TANDEM_FED_UPDATE_LATE itself, and
 * a retried attempt's with that attempt's view): TANDEM_EDGE_ROUND_MOVED_ON, which ends this
 * attempt as refused, and the owner asks for the round again.
 */
async function secAggView(rest: Rest, base: string, a: Round): Promise<SecAggView> {
  const path = `${base}/secagg`;
  const view = parseSecAggView(await rest.call('GET', path, undefined, secAggReplyBytes(a)), rest.where(path));
  if (view.round !== a.round || view.attempt !== a.attempt) {
    throw new EdgeError('TANDEM_EDGE_ROUND_MOVED_ON', `secure aggregation is at round ${view.round}.${view.attempt}, not ${a.round}.${a.attempt}: the round moved on`, {
      where: rest.where(path), details: { round: a.round, attempt: a.attempt, seenRound: view.round, seenAttempt: view.attempt },
    });
  }
  return view;
}

/** The code that ends an attempt as refused (the owner asks for the round again); undefined for any other failure. */
function refusalOf(error: unknown): string | undefined {
  if (!(error instanceof EdgeError)) return undefined;
  return error.code === 'TANDEM_EDGE_ROUND_MOVED_ON' ? error.code : error.remoteCode;
}

function secAggReplyBytes(a: Round): number {
  return MAX_JSON_REPLY_BYTES + a.sampledOwners.length * SECAGG_VIEW_BYTES_PER_OWNER;
}

/**
 * When a wait in the round gives up: one round's length (as this owner saw it, from the
 * assignment's arrival) past the deadline. The cloud moves a round on only once it notices the
 * deadline, and with an owner gone it begins the reveal only then.
 */
function waitLimit(a: Round): number {
  return a.deadlineMs + Math.max(0, a.deadlineMs - a.receivedMs);
}

/**
 * Polls the round's secure aggregation until it reaches `phase`; past waitLimit it is
 * TANDEM_EDGE_REQUEST_FAILED (a later round or attempt is TANDEM_EDGE_ROUND_MOVED_ON).
 */
async function waitPhase(rest: Rest, base: string, a: Round, phase: SecAggPhase, pollMs: number): Promise<SecAggView> {
  const until = waitLimit(a);
  for (;;) {
    const view = await secAggView(rest, base, a);
    if (SECAGG_PHASES.indexOf(view.phase) >= SECAGG_PHASES.indexOf(phase)) return view;
    if (Date.now() >= until) {
      throw new EdgeError('TANDEM_EDGE_REQUEST_FAILED', `round ${a.round}.${a.attempt}: secure aggregation is still in phase ${view.phase}, not ${phase}, well past the round's deadline ${a.deadline}`, {
        field: 'deadline', where: rest.where(`${base}/secagg`), details: { phase: view.phase, waitingFor: phase, deadline: a.deadline, gaveUpAt: new Date(until).toISOString() },
      });
    }
    await sleep(Math.min(pollMs, 100));
  }
}

/**
 * Heartbeats (POST .../alive) every third of the round's owner timeout while this owner works on
 * its part of the round, so that the cloud does not take it as gone; one that fails is no error
 * (the next one, or the owner's next call, counts as well). A beat the cloud answers with
 * `current: false` (the round moved on without this owner) aborts `moved`, which ends local
 * training at its next step. Returns the stop.
 */
function heartbeat(rest: Rest, base: string, a: Round, moved: AbortController): () => void {
  if (a.ownerTimeoutSeconds === undefined) return () => undefined;
  const where = rest.where(`${base}/alive`);
  const beat = (): void => void rest.call('POST', `${base}/alive`, { attempt: a.attempt }).then((reply) => {
    if (typeof reply === 'object' && reply !== null && (reply as { current?: unknown }).current === false) {
      moved.abort(new EdgeError('TANDEM_EDGE_ROUND_MOVED_ON', `round ${a.round}.${a.attempt} moved on without this owner`, { where, details: { round: a.round, attempt: a.attempt } }));
    }
  }, () => undefined);
  const timer = setInterval(beat, Math.max(100, (a.ownerTimeoutSeconds * 1000) / 3));
  timer.unref();
  return () => clearInterval(timer);
}

/** SecAgg steps 1 and 2 before local training: keys, then Shamir shares of the seeds, so a later dropout is recoverable. */
async function startSecAgg(rest: Rest, base: string, a: Round, length: number, pollMs: number): Promise<{ owner: SecAggOwner; seconds: number }> {
  const t0 = performance.now();
  const first = await secAggView(rest, base, a);
  // The owners masks are agreed with, and the count DP noise is split by, are one list.
  if ([...first.sampled].sort().join('\n') !== [...a.sampledOwners].sort().join('\n')) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `secure aggregation lists ${first.sampled.length} owners, the round ${a.sampledOwners.length}: not the same owners`, { field: 'sampled', where: rest.where(`${base}/secagg`) });
  }
  const owner = new SecAggOwner(a.owner, { round: first.label, length, threshold: first.threshold, owners: first.sampled.length });
  await rest.call('POST', `${base}/secagg/keys`, { attempt: a.attempt, ...owner.advertise() }, secAggReplyBytes(a));
  const view = await waitPhase(rest, base, a, 'shares', pollMs);
  await rest.call('POST', `${base}/secagg/shares`, { attempt: a.attempt, shares: owner.shareKeys(view.advertised) }, secAggReplyBytes(a));
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
async function splitModel(options: FederateOptions, a: Round, where: string): Promise<RoundModel> {
  const connect = () => connectCloud(options.cloud, { key: options.key, ca: options.ca });
  const client = await connect();
  try {
    const info = (await client.models()).find((m) => m.id === a.model);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(a.model)}`, { field: 'model' });
    // The federation's cut, else the model's default; either is the cloud's proposal, taken only with a block on each side.
    const cut = a.cut === undefined ? chooseCut(undefined, info.defaultCut, 'defaultCut', `${options.cloud} /v1/models`) : chooseCut(undefined, a.cut, 'cut', where);
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
async function trainRound(m: RoundModel, a: Round, options: FederateOptions, adapterDir: string, onStart: (trainRows: number) => void, signal: AbortSignal): Promise<TrainingResult> {
  const spec: TrainingSpec = {
    model: m.model, tokenizer: m.tokenizer, modelHash: m.modelHash, dataFile: options.data, baseModel: m.baseModel,
    recipe: { ...DEFAULT_RECIPE, ...options.recipe, steps: a.localSteps, seed: (options.recipe?.seed ?? 0) + a.round * 1009 + a.attempt },
    methods: [], adapterDir, evaluate: true, signal, ...(m.cut ? { cut: m.cut } : {}),
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
      const roundPath = `/v1/federations/${encodeURIComponent(options.federation)}/round`;
      let body: unknown;
      try {
        body = await rest.call('GET', roundPath, undefined, MAX_ROUND_REPLY_BYTES);
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
      const where = rest.where(roundPath);
      // Checked whole before anything is done with it: round and attempt name folders and paths below.
      const a = parseAssignment(body, where, options.federation);
      if (a.state !== 'open') return { rounds, state: a.state };
      if (!a.sampled || a.submitted || a.adapter === undefined) {
        await sleep(pollMs);
        continue;
      }
      const adapter = a.adapter;
      const base = `/v1/federations/${encodeURIComponent(options.federation)}/rounds/${a.round}`;
      const moved = new AbortController();
      const stopHeartbeat = heartbeat(rest, base, a, moved);
      const event = await (async (): Promise<FederateRoundEvent> => {
        const m = a.mode === 'split' ? (split ??= await splitModel(options, a, where)) : local;
        if (!m) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'the federation trains offsite: give the model folder to train on', { field: 'modelDir' });
        checkGlobalFits(adapter, m.model, where);
        const global = decodeGlobal(adapter, where);
        const secure = a.secureAggregation ? await startSecAgg(rest, base, a, adapter.values, pollMs) : undefined;
        await options.onTraining?.(a.round, a.attempt);
        const dir = join(options.workDir, `round-${a.round}-${a.attempt}`);
        let trainRows = 0;
        let result: TrainingResult;
        try {
          await writeGlobal(adapter.config, global, join(dir, 'global'));
          result = await trainRound(m, a, options, join(dir, 'global'), (rows) => (trainRows = rows), moved.signal);
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
        const delta = new Float32Array(global.flat.length);
        let o = 0;
        for (const k of global.keys) {
          const t = result.adapter.get(k);
          const want = global.tensors.get(k)!.data.length;
          if (!t || t.data.length !== want) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the trained adapter ${t ? `has ${t.data.length} values` : 'lacks'} of tensor ${k}, the global adapter ${want}`, { field: `adapter.tensors.${k}`, where });
          for (let i = 0; i < t.data.length; i++) delta[o + i] = t.data[i] - global.flat[o + i];
          o += t.data.length;
        }
        if (a.dp) clipUpdate(delta, a.dp.clipNorm);
        const loss = result.losses.length ? result.losses.reduce((s, l) => s + l, 0) / result.losses.length : 0;
        const examples = Math.max(1, trainRows);
        const update: RoundUpdate = { attempt: a.attempt, examples, loss };
        if (result.after) update.validation = { loss: result.after.loss, ...(result.after.accuracy === undefined ? {} : { accuracy: result.after.accuracy }) };
        const ev: FederateRoundEvent = { round: a.round, attempt: a.attempt, loss, examples, validation: result.after, updateBytes: delta.byteLength, update: delta };
        try {
          if (secure) {
            const t0 = performance.now();
            // The sum the cloud learns is Σ examples·delta (Σ delta under DP, each owner adding its share of the noise).
            const input = Float32Array.from(delta, (v) => (a.dp ? v : v * examples));
            if (a.dp) addGaussianNoise(input, splitNoiseStd(a.dp.noiseMultiplier, a.dp.clipNorm, a.sampledOwners.length));
            const view = await waitPhase(rest, base, a, 'masked', pollMs);
            update.masked = encodeUint32(secure.owner.maskInput(input, view.shares));
            ev.ack = parseAck(await rest.call('POST', `${base}/updates`, update), rest.where(`${base}/updates`), a);
            const reveal = await waitPhase(rest, base, a, 'reveal', pollMs);
            await rest.call('POST', `${base}/secagg/reveal`, { attempt: a.attempt, ...secure.owner.reveal(reveal.survivors) }, secAggReplyBytes(a));
            ev.secaggSeconds = secure.seconds + (performance.now() - t0) / 1000;
          } else {
            update.values = encodeFloat32(delta);
            ev.ack = parseAck(await rest.call('POST', `${base}/updates`, update), rest.where(`${base}/updates`), a);
          }
        } catch (error) {
          const refused = refusalOf(error);
          if (refused === undefined) throw error;
          ev.refused = refused; // the round moved on (late) or it was already in (replay): ask again
        }
        return ev;
      })().catch((error: unknown) => {
        const refused = refusalOf(error);
        if (refused !== undefined) return { round: a.round, attempt: a.attempt, loss: NaN, examples: 0, updateBytes: 0, update: new Float32Array(0), refused };
        throw error;
      }).finally(stopHeartbeat);
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
