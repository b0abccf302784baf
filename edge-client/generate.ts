// Split inference on the edge: the embedding, the bottom and top blocks and the head run here
// with the owner's adapter; the cloud runs the middle and keeps the middle's KV cache for the
// session (InferStep, protocol 1.2). Only hidden states cross: the prompt, the tokens and the
// adapter never leave the edge. Tokens are chosen exactly as generate() chooses them.
// The cloud's cache can vanish under a sequence (its split-inference worker died, the node
// restarted: the next step is refused with 4030, or the step in flight fails): the edge then
// sends the bottom's h_B of every position so far at position 0, which rebuilds the middle's
// cache, and sends the step again; its own caches are untouched.
import { GenerationLoop, KvCache, layerOf, loadAdapter, tf } from '../model/index.ts';
import type { GenerateOptions, GenerateResult, LlamaModel, PeftAdapter } from '../model/index.ts';
import { decodeTensor, encodeTensor } from '../protocol/index.ts';
import type { Cut } from '../protocol/index.ts';
import { loadEdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import { connectCloud } from './session.ts';
import type { EdgeSession } from './session.ts';
import { chooseCut } from './proposed-cut.ts';

export type SplitGenerateOptions = Omit<GenerateOptions, 'hooks' | 'topLogits'>;

/** Refuses an adapter that changes the middle: the cloud runs the middle without it. */
function checkEdgeOnly(adapter: PeftAdapter, bottom: number, top: number, layers: number): void {
  for (const key of adapter.state().keys()) {
    const layer = layerOf(key);
    if (layer !== undefined && layer >= bottom && layer < layers - top) {
      throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `the adapter changes block ${layer}, which the cloud runs (the middle is [${bottom}, ${layers - top})); train it with layers_to_transform outside the middle, or use a deeper cut`, { field: 'adapter' });
    }
  }
}

/**
 * Generates with the edge part `edge` (a model holding the embedding, blocks [0, bottom) and
 * [L-top, L), the norm and the head) and the session's cloud middle.
 */
export async function splitGenerate(session: EdgeSession, edge: LlamaModel, inputIds: number[], options: SplitGenerateOptions, adapter?: PeftAdapter): Promise<GenerateResult> {
  const { bottom, top } = session.welcome.cut;
  const layers = edge.numLayers;
  if (adapter !== undefined) checkEdgeOnly(adapter, bottom, top, layers);
  const hooks = adapter?.hooks;
  const loop = new GenerationLoop(edge.config, inputIds, options);
  const cache = new KvCache();
  const codec = session.welcome.codecs.forward;
  let position = 0;
  /** Every token run so far, for rebuilding the cloud's cache. */
  const fed: number[] = [];
  const bottomOf = (ids: number[], kv: KvCache, offset: number): tf.Tensor3D => tf.tidy(() => edge.blocks(edge.embed(tf.tensor2d(ids, [1, ids.length], 'int32'), { hooks }), 0, bottom, { cache: kv, positionOffset: offset, hooks }));
  const inferStep = (at: number, frame: ReturnType<typeof encodeTensor>) => session.request({ case: 'inferStep', value: { sessionId: session.id, position: at, frames: [frame] } });
  /** The middle's cache again, from position 0 to `position` (the h_M it answers is already in the top's cache). */
  const rebuild = async (): Promise<void> => {
    const scratch = new KvCache();
    try {
      const hAll = bottomOf(fed, scratch, 0);
      const frame = encodeTensor(hAll.dataSync() as Float32Array, hAll.shape, codec, { name: 'h_B' });
      hAll.dispose();
      await inferStep(0, frame);
    } finally {
      scratch.dispose();
    }
  };
  const lostCache = (error: unknown): boolean => {
    const code = (error as EdgeError).remoteCode;
    return code === 'TANDEM_PROTO_INFER_POSITION_INVALID' || code === 'TANDEM_COMPUTE_FAILED';
  };
  try {
    let next: number[] | undefined = loop.first();
    while (next !== undefined) {
      const run = next;
      const hB = bottomOf(run, cache, position);
      const shape = hB.shape;
      const frame = encodeTensor(hB.dataSync() as Float32Array, shape, codec, { name: 'h_B' });
      hB.dispose();
      let reply;
      try {
        reply = await inferStep(position, frame);
      } catch (error) {
        // Once a step: a cloud that loses the cache again fails the generation.
        if (!lostCache(error)) throw error;
        if (position > 0) await rebuild();
        reply = await inferStep(position, frame);
      }
      if (reply.body.case !== 'inferStepResult' || reply.body.value.position !== position || reply.body.value.frames.length !== 1) {
        throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `InferStep at ${position} was answered by ${reply.body.case}`, { field: 'infer_step_result' });
      }
      const hMFrame = reply.body.value.frames[0];
      if (hMFrame.shape.length !== 3 || hMFrame.shape.some((d, i) => d !== shape[i])) {
        throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `h_M has shape [${hMFrame.shape}]; h_B had [${shape}]`, { field: 'infer_step_result.frames[0]' });
      }
      const hM = decodeTensor(hMFrame, { field: 'infer_step_result.frames[0] (h_M)' });
      const last = tf.tidy(() => {
        const h = edge.blocks(tf.tensor3d(hM, [1, run.length, shape[2]]), layers - top, layers, { cache, positionOffset: position, hooks });
        const logits = edge.head(h);
        return tf.reshape(tf.slice(logits, [0, run.length - 1, 0], [1, 1, logits.shape[2]]), [logits.shape[2]]);
      });
      const values = last.dataSync() as Float32Array;
      last.dispose();
      position += run.length;
      fed.push(...run);
      next = loop.take(values);
    }
  } finally {
    cache.dispose();
    await session.request({ case: 'inferEnd', value: { sessionId: session.id } }).catch(() => undefined);
  }
  return loop.result();
}

export interface EdgeGenerateOptions extends SplitGenerateOptions {
  cloud: string;
  key: string;
  ca?: string;
  /** The model id the cloud serves; its only model when not given. */
  model?: string;
  /** The private PEFT adapter folder, loaded on the edge only. */
  adapterDir?: string;
  prompt: string;
  /** The model's default cut unless given. */
  cut?: Cut;
  cacheDir?: string;
}

/** `tandem edge generate`: downloads the edge part, opens a session and generates with the cloud's middle. */
export async function edgeGenerate(options: EdgeGenerateOptions): Promise<GenerateResult & { inputIds: number[]; text: string }> {
  const client = await connectCloud(options.cloud, { key: options.key, ca: options.ca });
  let edge: Awaited<ReturnType<typeof loadEdgePart>> | undefined;
  let adapter: PeftAdapter | undefined;
  try {
    const models = await client.models();
    const info = options.model === undefined ? models[0] : models.find((m) => m.id === options.model);
    if (!info) throw new EdgeError('TANDEM_EDGE_MODEL_UNKNOWN', `the cloud serves no model ${JSON.stringify(options.model)}`, { field: 'model' });
    const cut = chooseCut(options.cut, info.defaultCut, 'defaultCut', `${options.cloud} GET /v1/models ${info.id}`);
    edge = await loadEdgePart(await client.downloadEdge(info.id, cut, options.cacheDir));
    adapter = options.adapterDir === undefined ? undefined : await loadAdapter(edge.model, options.adapterDir);
    const session = await client.openSession({ model: { id: info.id, contentHash: edge.contentHash }, cut, codecs: { forward: [{ codec: 'f32' }], backward: [{ codec: 'f32' }] } });
    try {
      const inputIds = edge.tokenizer.encode(options.prompt);
      const result = await splitGenerate(session, edge.model, inputIds, options, adapter);
      return { ...result, inputIds, text: edge.tokenizer.decode([...inputIds, ...result.generatedIds], { skipSpecialTokens: true, skipOutOfVocabulary: true }) };
    } finally {
      await session.close();
    }
  } finally {
    adapter?.dispose();
    edge?.model.dispose();
    client.close();
  }
}
