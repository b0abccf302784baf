import { ModelError } from './errors.ts';
import { MODEL_FAMILIES } from './families/index.ts';

/** The model_types Tandem runs (model/families), in registration order. */
export const SUPPORTED_MODEL_TYPES: readonly string[] = MODEL_FAMILIES.modelTypes();
/** A Hugging Face model_type of a registered family. */
export type ModelType = string;

/** llama3-style rope scaling (`rope_type: "llama3"`) or linear scaling. */
export interface RopeScaling {
  ropeType: 'llama3' | 'linear' | 'default';
  factor: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  originalMaxPositionEmbeddings?: number;
}

/** A model configuration in camelCase; `raw` keeps config.json as read, to write it back unchanged. */
export interface ModelConfig {
  modelType: ModelType;
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  vocabSize: number;
  /**
   * The longest sequence the model computes: max_position_embeddings, or the attention window
   * when one is set and shorter (slidingWindowOf).
   */
  maxPositionEmbeddings: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling?: RopeScaling;
  tieWordEmbeddings: boolean;
  /** q, k and v projections carry a bias (Qwen2). */
  attentionBias: boolean;
  /** The MLP projections carry a bias (some llama variants). */
  mlpBias: boolean;
  hiddenAct: 'silu';
  bosTokenId?: number;
  eosTokenIds: number[];
  raw: Record<string, unknown>;
}

/**
 * The largest sizes config.json may declare, checked before anything is sized from them (a
 * num_hidden_layers of 1e9 once cost 36 s and 2.5 GB in expectedTensorShapes). Each is many
 * times what real checkpoints use: Llama-3.1-405B has 126 layers, hidden 16384, intermediate
 * 53248, 128 heads, head_dim 128, vocab 128256 and 131072 positions; Qwen2 has vocab 151936,
 * Gemma-style models head_dim 256, and million-token-context models ~1M positions.
 */
export const MODEL_CONFIG_LIMITS = {
  num_hidden_layers: 1024,
  hidden_size: 65536,
  intermediate_size: 262144,
  num_attention_heads: 1024,
  num_key_value_heads: 1024,
  head_dim: 1024,
  vocab_size: 2 ** 21,
  max_position_embeddings: 2 ** 24,
  original_max_position_embeddings: 2 ** 24,
} as const;

type LimitedField = keyof typeof MODEL_CONFIG_LIMITS;

/** An integer in [1, MODEL_CONFIG_LIMITS[key]]; absent (or null) takes `fallback`. */
function boundedInt(raw: Record<string, unknown>, key: LimitedField, file: string, fallback?: number): number {
  const v = raw[key] ?? fallback;
  const max = MODEL_CONFIG_LIMITS[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > max) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `${key} must be an integer in [1, ${max}], got ${JSON.stringify(v) ?? String(v)}`, {
      file,
      field: key,
      details: { limit: max },
    });
  }
  return v;
}

/** A JSON boolean; absent takes `fallback`. Anything else is refused, not coerced ("false" is not false). */
function booleanField(raw: Record<string, unknown>, key: string, file: string, fallback: boolean): boolean {
  const v = raw[key];
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `${key} must be true or false, got ${JSON.stringify(v)}`, { file, field: key });
  return v;
}

/** A token id: an integer in [0, vocab_size). */
function isTokenId(v: unknown, vocabSize: number): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < vocabSize;
}

function positiveNumber(raw: Record<string, unknown>, key: string, file: string, fallback: number): number {
  const v = raw[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `${key} must be a positive number, got ${JSON.stringify(v)}`, { file, field: key });
  }
  return v;
}

function parseRopeScaling(v: unknown, file: string): RopeScaling | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'rope_scaling must be an object', { file, field: 'rope_scaling' });
  const r = v as Record<string, unknown>;
  const type = (r.rope_type ?? r.type) as string;
  if (type !== 'llama3' && type !== 'linear' && type !== 'default') {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `rope_scaling type ${JSON.stringify(type)} is not supported (llama3, linear, default)`, { file, field: 'rope_scaling' });
  }
  const factor = type === 'default' ? 1 : positiveNumber(r, 'factor', file, NaN);
  if (type !== 'llama3') return { ropeType: type, factor };
  const lowFreqFactor = positiveNumber(r, 'low_freq_factor', file, 1);
  const highFreqFactor = positiveNumber(r, 'high_freq_factor', file, 4);
  // The smoothing between the two wavelengths divides by their difference.
  if (!(highFreqFactor > lowFreqFactor)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `rope_scaling.high_freq_factor (${highFreqFactor}) must be above low_freq_factor (${lowFreqFactor})`, { file, field: 'rope_scaling' });
  }
  return { ropeType: 'llama3', factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings: boundedInt(r, 'original_max_position_embeddings', file, 8192) };
}

/**
 * The attention window of a config, when some layer attends to a window only: Mistral's
 * sliding_window (null for none), Qwen2's when use_sliding_window is on for the layers from
 * max_window_layers. The forward here attends to every earlier position, which equals windowed
 * attention exactly for sequences no longer than the window: the model's context is cut to it,
 * so a longer sequence is refused (it was computed with full attention, silently).
 */
function slidingWindowOf(r: Record<string, unknown>, modelType: string, numHiddenLayers: number, file: string): number | undefined {
  const window = (fallback?: number): number => {
    const w = r.sliding_window ?? fallback;
    if (typeof w !== 'number' || !Number.isInteger(w) || w < 1) throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `sliding_window must be a positive integer or null, got ${JSON.stringify(w) ?? String(w)}`, { file, field: 'sliding_window' });
    return w;
  };
  if (modelType === 'mistral') return r.sliding_window === undefined || r.sliding_window === null ? undefined : window();
  // Qwen2 (transformers' defaults: max_window_layers 28, sliding_window 4096; null turns it off).
  if (r.use_sliding_window !== true || r.sliding_window === null) return undefined;
  const fromLayer = r.max_window_layers ?? 28;
  if (typeof fromLayer !== 'number' || !Number.isInteger(fromLayer) || fromLayer < 0) throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `max_window_layers must be a non-negative integer, got ${JSON.stringify(fromLayer)}`, { file, field: 'max_window_layers' });
  return fromLayer < numHiddenLayers ? window(4096) : undefined;
}

/** Parses a Hugging Face config.json object. Any model_type outside the LLaMA family is a typed error naming it. */
export function parseModelConfig(raw: unknown, file = 'config.json'): ModelConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'config.json must hold a JSON object', { file });
  }
  const r = raw as Record<string, unknown>;
  const family = MODEL_FAMILIES.get(r.model_type, file);
  const modelType = family.modelType;
  const hiddenSize = boundedInt(r, 'hidden_size', file);
  const intermediateSize = boundedInt(r, 'intermediate_size', file);
  const numHiddenLayers = boundedInt(r, 'num_hidden_layers', file);
  const vocabSize = boundedInt(r, 'vocab_size', file);
  const window = slidingWindowOf(r, family.modelType, numHiddenLayers, file);
  const maxPositionEmbeddings = Math.min(boundedInt(r, 'max_position_embeddings', file, 2048), window ?? Infinity);
  const numAttentionHeads = boundedInt(r, 'num_attention_heads', file);
  const numKeyValueHeads = boundedInt(r, 'num_key_value_heads', file, numAttentionHeads);
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `num_attention_heads (${numAttentionHeads}) must be a multiple of num_key_value_heads (${numKeyValueHeads})`, {
      file,
      field: 'num_key_value_heads',
    });
  }
  const headDim = boundedInt(r, 'head_dim', file, Math.floor(hiddenSize / numAttentionHeads));
  if (headDim % 2 !== 0) throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `head_dim must be even for rotary embeddings, got ${headDim}`, { file, field: 'head_dim' });
  const act = r.hidden_act ?? 'silu';
  if (act !== 'silu') throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `hidden_act ${JSON.stringify(act)} is not supported (silu)`, { file, field: 'hidden_act' });
  // HF writes eos_token_id as one id or a list of ids; null or absent means none.
  const eos = r.eos_token_id;
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? (eos as unknown[]) : [eos];
  if (!eosTokenIds.every((e) => isTokenId(e, vocabSize))) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `eos_token_id must be an integer or a list of integers in [0, vocab_size ${vocabSize}), got ${JSON.stringify(eos)}`, {
      file,
      field: 'eos_token_id',
      details: { limit: vocabSize },
    });
  }
  const bos = r.bos_token_id;
  if (bos !== undefined && bos !== null && !isTokenId(bos, vocabSize)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `bos_token_id must be an integer in [0, vocab_size ${vocabSize}), got ${JSON.stringify(bos)}`, {
      file,
      field: 'bos_token_id',
      details: { limit: vocabSize },
    });
  }
  // The family reads attention_bias (Qwen2 ignores it); whatever it holds must be a real boolean first.
  booleanField(r, 'attention_bias', file, false);
  return {
    modelType,
    hiddenSize,
    intermediateSize,
    numHiddenLayers,
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    vocabSize,
    maxPositionEmbeddings,
    rmsNormEps: positiveNumber(r, 'rms_norm_eps', file, 1e-6),
    ropeTheta: positiveNumber(r, 'rope_theta', file, 10000),
    ropeScaling: parseRopeScaling(r.rope_scaling, file),
    tieWordEmbeddings: booleanField(r, 'tie_word_embeddings', file, false),
    attentionBias: family.attentionBias(r),
    mlpBias: booleanField(r, 'mlp_bias', file, false),
    hiddenAct: 'silu',
    bosTokenId: bos === undefined || bos === null ? undefined : (bos as number),
    eosTokenIds: eosTokenIds as number[],
    raw: r,
  };
}

/** The Hugging Face tensor names and shapes a model with this configuration must have, in a stable order. */
export function expectedTensorShapes(config: ModelConfig): Map<string, number[]> {
  const h = config.hiddenSize;
  const q = config.numAttentionHeads * config.headDim;
  const kv = config.numKeyValueHeads * config.headDim;
  const m = config.intermediateSize;
  const shapes = new Map<string, number[]>();
  shapes.set('model.embed_tokens.weight', [config.vocabSize, h]);
  for (let i = 0; i < config.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    shapes.set(`${p}.input_layernorm.weight`, [h]);
    shapes.set(`${p}.self_attn.q_proj.weight`, [q, h]);
    shapes.set(`${p}.self_attn.k_proj.weight`, [kv, h]);
    shapes.set(`${p}.self_attn.v_proj.weight`, [kv, h]);
    if (config.attentionBias) {
      shapes.set(`${p}.self_attn.q_proj.bias`, [q]);
      shapes.set(`${p}.self_attn.k_proj.bias`, [kv]);
      shapes.set(`${p}.self_attn.v_proj.bias`, [kv]);
    }
    shapes.set(`${p}.self_attn.o_proj.weight`, [h, q]);
    shapes.set(`${p}.post_attention_layernorm.weight`, [h]);
    shapes.set(`${p}.mlp.gate_proj.weight`, [m, h]);
    shapes.set(`${p}.mlp.up_proj.weight`, [m, h]);
    shapes.set(`${p}.mlp.down_proj.weight`, [h, m]);
    if (config.mlpBias) {
      shapes.set(`${p}.mlp.gate_proj.bias`, [m]);
      shapes.set(`${p}.mlp.up_proj.bias`, [m]);
      shapes.set(`${p}.mlp.down_proj.bias`, [h]);
    }
  }
  shapes.set('model.norm.weight', [h]);
  if (!config.tieWordEmbeddings) shapes.set('lm_head.weight', [config.vocabSize, h]);
  return shapes;
}
