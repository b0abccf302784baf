// Split training on the edge: what is remote about it and nothing else. Download the edge
// part, open a session, and hand model/train's one training run the cloud as its middle.
// The run holds the data, the adapter, the optimizer, checkpoints and exact resume.
import {
  DEFAULT_RECIPE, DefendedMiddle, ModelError, autoDefenses, checkDefenses, checkRecipeFitsModel, checkRun, checkpointFolder, hiddenNoiseStd, parseModelConfig, runTraining, seedsOf, specVirtualTokens,
} from '../model/index.ts';
import type { Cut, Defenses, Evaluation, MethodSpec, RunSettings, TrainEvent, TrainEventHandler, TrainRecipe } from '../model/index.ts';
import { CODEC_NAMES } from '../protocol/index.ts';
import { MIDDLE_ADAPTER_LIMITS } from '../protocol/index.ts';
import type { CodecName, CodecSpec, Defense, MiddleAdapterSpec } from '../protocol/index.ts';
import { middleAdapterLayout, writeSplitAdapter } from './held-export.ts';
import { loadEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import type { MiddleTraffic } from './remote-middle.ts';
import { connectCloud } from './session.ts';
import { chooseCut } from './proposed-cut.ts';

export interface EdgeTrainOptions extends Partial<TrainRecipe>, Omit<RunSettings, 'adapterOut' | 'stopAfter'> {
  /** The cloud node's base URL, e.g. http://127.0.0.1:8080. */
  cloud: string;
  key: string;
  /** PEM CA certificate(s) for an https:// cloud with a private CA. */
  ca?: string;
  /** A model id the cloud serves (GET /v1/models). */
  model: string;
  /** A .jsonl ({"text"}, {"prompt","completion"} or {"text","label"}) or plain-text file. */
  data: string;
  /** Defaults to the model's default cut. */
  cut?: Cut;
  /** PEFT methods on the edge's blocks; default LoRA r 8 on q_proj and v_proj. */
  methods?: MethodSpec[];
  codecForward?: CodecName | CodecSpec;
  codecBackward?: CodecName | CodecSpec;
  /** Where checkpoints go; an existing checkpoint there is resumed. */
  checkpointDir?: string;
  /** true: the checkpoint must exist; 'auto' (default): resume one if there is one. */
  resume?: true | 'auto';
  /** Write the final adapter as a PEFT folder here. */
  out?: string;
  cacheDir?: string;
  requestTimeoutMs?: number;
  retries?: number;
  /**
   * Privacy defenses applied here to h_B and g_M before they leave (a deeper bottom moves the cut); offered in Hello.
   * 'auto': the measured defaults fitted to the model and cut (`autoDefenses`), once the cloud has said its model's blocks.
   */
  defenses?: Defenses | 'auto';
  /**
   * LoRA on the middle blocks, held and trained by the cloud (protocol 1.3): initialised from
   * this run's seed as the next method after `methods`, stepped with this run's AdamW at every
   * step, handed over at the end and written with the edge's parts as one PEFT folder.
   */
  middleLora?: MiddleLoraOptions;
}

export interface MiddleLoraOptions {
  /** lora (default) or ia3. */
  method?: 'lora' | 'ia3';
  /** LoRA's rank (unused by ia3). */
  r?: number;
  /** lora_alpha; 2·r by default. */
  alpha?: number;
  /** target_modules; q_proj and v_proj by default (ia3: k_proj, v_proj, down_proj; down_proj's input is scaled). */
  targets?: string[];
}

/** The middle adapter as Hello asks for it: the seed chain and AdamW of this run. */
export function middleAdapterSpec(o: MiddleLoraOptions, recipe: TrainRecipe, edgeMethods: number): MiddleAdapterSpec {
  const method = o.method ?? 'lora';
  if (method !== 'lora' && method !== 'ia3') throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `middle adapter method must be lora or ia3, got ${JSON.stringify(method)}`, { field: 'middleLora.method' });
  const r = method === 'lora' ? o.r : 0;
  if (method === 'lora' && (r === undefined || !Number.isInteger(r) || r < 1 || r > MIDDLE_ADAPTER_LIMITS.rank)) {
    throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `middle LoRA rank must be an integer from 1 to ${MIDDLE_ADAPTER_LIMITS.rank}, got ${o.r}`, { field: 'middleLora.r' });
  }
  const rank = r ?? 0;
  const alpha = method === 'lora' ? (o.alpha ?? 2 * rank) : 0;
  if (method === 'lora' && (!Number.isFinite(alpha) || alpha <= 0)) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `middle LoRA alpha must be a number > 0, got ${alpha}`, { field: 'middleLora.alpha' });
  const targets = o.targets ?? (method === 'ia3' ? ['k_proj', 'v_proj', 'down_proj'] : ['q_proj', 'v_proj']);
  if (targets.length === 0 || targets.length > MIDDLE_ADAPTER_LIMITS.targets) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `the middle adapter needs 1 to ${MIDDLE_ADAPTER_LIMITS.targets} target modules`, { field: 'middleLora.targets' });
  if (recipe.optimizer !== 'adamw') throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `the cloud steps a middle adapter with AdamW; this run uses ${recipe.optimizer}`, { field: 'optimizer' });
  return { method, rank, alpha, targets: [...targets], seed: seedsOf(recipe.seed).adapter, methodIndex: edgeMethods, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: recipe.weightDecay };
}

/** The defenses as Hello offers them; a noise clip of 0 is fixed later from the first h_B, so its std is not stated yet. */
export function defensesToWire(d: Defenses, hidden: number): Defense[] {
  const out: Defense[] = [];
  if (d.noise) out.push({ name: 'noise', scale: d.noise.sigma, clip: d.noise.clip, noiseStd: d.noise.clip > 0 ? hiddenNoiseStd(d.noise, hidden) : 0 });
  if (d.deeperBottom) out.push({ name: 'deeper-bottom', scale: d.deeperBottom, clip: 0, noiseStd: 0 });
  if (d.maxNorm) out.push({ name: 'max-norm', scale: 0, clip: 0, noiseStd: 0 });
  if (d.gradientNoise) out.push({ name: 'gradient-noise', scale: d.gradientNoise.rho, clip: 0, noiseStd: 0 });
  if (d.nopeek) out.push({ name: 'nopeek', scale: d.nopeek.weight, clip: 0, noiseStd: 0 });
  if (d.marvell) out.push({ name: 'marvell', scale: d.marvell.scale, clip: 0, noiseStd: 0 });
  return out;
}

export interface WireSummary {
  bytesSent: number;
  bytesReceived: number;
  requests: number;
  retries: number;
  reconnects: number;
  reattached: number;
  reopened: number;
  meanRttMs: number;
  /** Tensor-frame bytes per trained token (a token position of a training row), each way. */
  upBytesPerToken: number;
  downBytesPerToken: number;
  frames: MiddleTraffic;
}

export interface EdgeTrainResult {
  model: string;
  contentHash: string;
  /** Blocks of the whole model, as the cloud describes it. */
  numLayers: number;
  cut: Cut;
  codecs: { forward: CodecSpec; backward: CodecSpec };
  methods: MethodSpec[];
  /** Step the run started from (0, or the checkpoint's). */
  startStep: number;
  steps: number;
  /** Loss of each step this run took, in order. */
  losses: number[];
  before?: Evaluation;
  after?: Evaluation;
  wire: WireSummary;
  trainableParameters: number;
  seconds: number;
  /** The adapter's tensors at the end, by PEFT key. */
  adapter: Map<string, { shape: number[]; data: Float32Array }>;
}

export const DEFAULT_METHODS: MethodSpec[] = [{ method: 'lora', r: 8, loraAlpha: 16, targetModules: ['q_proj', 'v_proj'] }];

function codecSpec(c: CodecName | CodecSpec | undefined, field: string): CodecSpec {
  const spec = typeof c === 'string' ? { codec: c } : (c ?? { codec: 'f32' as const });
  if (!(CODEC_NAMES as readonly string[]).includes(spec.codec)) {
    throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `unknown codec ${JSON.stringify(spec.codec)}; choose one of ${CODEC_NAMES.join(', ')}`, { field });
  }
  return spec;
}

/** The recipe of a split run: the options given, DEFAULT_RECIPE's for the rest. */
export function edgeRecipe(options: Partial<TrainRecipe>): TrainRecipe {
  const recipe: TrainRecipe = { ...DEFAULT_RECIPE, steps: 100 };
  for (const k of Object.keys(recipe) as (keyof TrainRecipe)[]) if (options[k] !== undefined) (recipe as unknown as Record<string, unknown>)[k] = options[k];
  return recipe;
}

/** Fine-tunes the adapter on the edge with the cloud running the middle of the model. */
export async function trainEdge(options: EdgeTrainOptions): Promise<EdgeTrainResult> {
  const t0 = performance.now();
  // Everything is checked before the network is touched.
  const recipe = edgeRecipe(options);
  checkRun(recipe, options);
  const forward = codecSpec(options.codecForward, 'codecForward');
  const backward = codecSpec(options.codecBackward, 'codecBackward');
  const methods = options.methods ?? DEFAULT_METHODS;
  const virtualTokens = specVirtualTokens(methods);
  const given = options.defenses === undefined || options.defenses === 'auto' ? options.defenses : checkDefenses(options.defenses);
  const middleAdapter = options.middleLora === undefined ? undefined : middleAdapterSpec(options.middleLora, recipe, methods.length);
  if (middleAdapter !== undefined && given !== undefined) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'a middle LoRA held by the cloud does not combine with privacy defenses yet', { field: 'middleLora' });
  // An edge checkpoint does not hold the cloud's part: resuming one would pair it with a fresh middle adapter.
  if (middleAdapter !== undefined && options.checkpointDir !== undefined) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'a middle LoRA held by the cloud does not combine with edge checkpoints yet (the cloud checkpoints its part itself)', { field: 'checkpointDir' });

  const client = await connectCloud(options.cloud, { key: options.key, requestTimeoutMs: options.requestTimeoutMs, retries: options.retries, ca: options.ca });
  let edge: Awaited<ReturnType<typeof loadEdgePart>> | undefined;
  try {
    const info = (await client.models()).find((m) => m.id === options.model);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(options.model)}`, { field: 'model' });
    // The model's positions are known from its description: a row too long for them is refused before the download.
    checkRecipeFitsModel(recipe, parseModelConfig(info.config, `${options.cloud} GET /v1/models ${info.id}`), virtualTokens);
    const asked = chooseCut(options.cut, info.defaultCut, 'defaultCut', `${options.cloud} GET /v1/models ${info.id}`);
    const defenses = given === 'auto' ? checkDefenses(autoDefenses(info.numLayers, asked)) : given;
    const cut = defenses?.deeperBottom ? { bottom: asked.bottom + defenses.deeperBottom, top: asked.top } : asked;
    const part = await client.downloadEdge(info.id, cut, options.cacheDir);
    edge = await loadEdgePart(part);
    // `auto` defenses were chosen for the layers the model list names: the part must be of that model.
    if (edge.config.numHiddenLayers !== info.numLayers) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the model list says ${info.id} has ${info.numLayers} layers, its edge part's config ${edge.config.numHiddenLayers}`, { field: 'numLayers', where: `${options.cloud} GET /v1/models` });
    }
    const session = await client.openSession({ model: { id: info.id, contentHash: edge.contentHash }, cut, codecs: { forward: [forward], backward: [backward] }, methods: methods.map((m) => m.method), ...(defenses ? { defenses: defensesToWire(defenses, edge.config.hiddenSize) } : {}), ...(middleAdapter ? { middleAdapter } : {}) });
    const remoteMiddle = session.middle({ heldAdapter: middleAdapter !== undefined });
    const middle = defenses ? new DefendedMiddle(remoteMiddle, defenses, options.seed ?? 0) : remoteMiddle;
    const remote = { model: info.id, contentHash: edge.contentHash, codecs: { forward: forward.codec, backward: backward.codec }, downloadedBytes: part.downloadedBytes, cached: part.cached };
    let trainedTokens = 0;
    // The run's events, with what only the edge knows: the download and the wire.
    const onEvent: TrainEventHandler = (e: TrainEvent) => {
      if (e.type === 'start') return options.onEvent?.({ ...e, remote });
      if (e.type === 'step') {
        trainedTokens += e.tokens;
        const s = client.stats;
        return options.onEvent?.({ ...e, wire: { bytesSent: s.bytesSent, bytesReceived: s.bytesReceived, rttMs: s.lastRttMs } });
      }
      return options.onEvent?.(e);
    };
    let result;
    try {
      result = await runTraining({
        model: edge.model, tokenizer: edge.tokenizer, modelHash: edge.contentHash, dataFile: options.data, recipe, cut, methods, middle,
        store: options.checkpointDir === undefined ? undefined : checkpointFolder(options.checkpointDir), resume: options.resume ?? 'auto', baseModel: info.id,
        evalEvery: options.evalEvery, evaluate: options.evaluate, ...(defenses?.nopeek ? { noPeek: defenses.nopeek.weight } : {}), saveEvery: options.saveEvery,
        // With a held middle adapter the folder is written below, once the cloud has handed its part over.
        adapterOut: middleAdapter === undefined ? options.out : undefined, onEvent,
        engine: options.engine, log: options.log,
      });
      if (middleAdapter !== undefined && result.step > result.startStep) {
        const middleTensors = await remoteMiddle.exportAdapter(middleAdapterLayout(edge.model, middleAdapter, cut));
        const edgeKeys = new Set(result.adapter.keys());
        for (const [k, t] of middleTensors) {
          if (edgeKeys.has(k)) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the middle adapter's tensor ${k} is also an edge tensor`, { field: 'stepCommitted.frames' });
          result.adapter.set(k, t);
        }
        if (options.out !== undefined) await writeSplitAdapter(options.out, { edgeMethods: methods, middle: middleAdapter, tensors: result.adapter, edgeKeys, baseModel: info.id });
      }
    } catch (cause) {
      // A checkpoint of another run names the setting that differs.
      if (cause instanceof ModelError && cause.code === 'TANDEM_CHECKPOINT_INVALID' && cause.field !== undefined) {
        throw new EdgeError('TANDEM_EDGE_CHECKPOINT_MISMATCH', cause.message, { where: options.checkpointDir, field: cause.field, cause });
      }
      throw cause;
    } finally {
      middle.dispose();
    }
    await session.close('completed');
    const s = client.stats;
    const frames = { ...remoteMiddle.traffic };
    return {
      model: info.id,
      contentHash: edge.contentHash,
      numLayers: info.numLayers,
      cut,
      codecs: { forward: session.welcome.codecs.forward, backward: session.welcome.codecs.backward },
      methods: result.methods,
      startStep: result.startStep,
      steps: result.step,
      losses: result.losses,
      before: result.before,
      after: result.after,
      wire: {
        bytesSent: s.bytesSent, bytesReceived: s.bytesReceived, requests: s.requests, retries: s.retries, reconnects: s.reconnects,
        reattached: session.reattached, reopened: session.reopened, meanRttMs: s.meanRttMs,
        upBytesPerToken: trainedTokens > 0 ? (frames.forwardUpBytes + frames.backwardUpBytes) / trainedTokens : 0,
        downBytesPerToken: trainedTokens > 0 ? (frames.forwardDownBytes + frames.backwardDownBytes) / trainedTokens : 0,
        frames,
      },
      trainableParameters: result.trainableParameters,
      seconds: (performance.now() - t0) / 1000,
      adapter: result.adapter,
    };
  } finally {
    edge?.model.dispose();
    client.close();
  }
}
