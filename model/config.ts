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

function positiveInt(raw: Record<string, unknown>, key: string, file: string, fallback?: number): number {
  const v = raw[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `${key} must be a positive integer, got ${JSON.stringify(v)}`, { file, field: key });
  }
  return v;
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
  if (typeof v !== 'object') throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'rope_scaling must be an object', { file, field: 'rope_scaling' });
  const r = v as Record<string, unknown>;
  const type = (r.rope_type ?? r.type) as string;
  if (type !== 'llama3' && type !== 'linear' && type !== 'default') {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `rope_scaling type ${JSON.stringify(type)} is not supported (llama3, linear, default)`, { file, field: 'rope_scaling' });
  }
  const factor = type === 'default' ? 1 : positiveNumber(r, 'factor', file, NaN);
  if (type !== 'llama3') return { ropeType: type, factor };
  return {
    ropeType: 'llama3',
    factor,
    lowFreqFactor: positiveNumber(r, 'low_freq_factor', file, 1),
    highFreqFactor: positiveNumber(r, 'high_freq_factor', file, 4),
    originalMaxPositionEmbeddings: positiveInt(r, 'original_max_position_embeddings', file, 8192),
  };
}

/** Parses a Hugging Face config.json object. Any model_type outside the LLaMA family is a typed error naming it. */
export function parseModelConfig(raw: unknown, file = 'config.json'): ModelConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'config.json must hold a JSON object', { file });
  }
  const r = raw as Record<string, unknown>;
  const family = MODEL_FAMILIES.get(r.model_type, file);
  const modelType = family.modelType;
  const hiddenSize = positiveInt(r, 'hidden_size', file);
  const numAttentionHeads = positiveInt(r, 'num_attention_heads', file);
  const numKeyValueHeads = positiveInt(r, 'num_key_value_heads', file, numAttentionHeads);
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `num_attention_heads (${numAttentionHeads}) must be a multiple of num_key_value_heads (${numKeyValueHeads})`, {
      file,
      field: 'num_key_value_heads',
    });
  }
  const headDim = positiveInt(r, 'head_dim', file, Math.floor(hiddenSize / numAttentionHeads));
  if (headDim % 2 !== 0) throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `head_dim must be even for rotary embeddings, got ${headDim}`, { file, field: 'head_dim' });
  const act = r.hidden_act ?? 'silu';
  if (act !== 'silu') throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', `hidden_act ${JSON.stringify(act)} is not supported (silu)`, { file, field: 'hidden_act' });
  const eos = r.eos_token_id;
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos.map(Number) : [Number(eos)];
  if (eosTokenIds.some((e) => !Number.isInteger(e) || e < 0)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'eos_token_id must be an integer or a list of integers', { file, field: 'eos_token_id' });
  }
  const bos = r.bos_token_id;
  if (bos !== undefined && bos !== null && (!Number.isInteger(bos) || (bos as number) < 0)) {
    throw new ModelError('TANDEM_MODEL_CONFIG_INVALID', 'bos_token_id must be an integer', { file, field: 'bos_token_id' });
  }
  return {
    modelType,
    hiddenSize,
    intermediateSize: positiveInt(r, 'intermediate_size', file),
    numHiddenLayers: positiveInt(r, 'num_hidden_layers', file),
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    vocabSize: positiveInt(r, 'vocab_size', file),
    maxPositionEmbeddings: positiveInt(r, 'max_position_embeddings', file, 2048),
    rmsNormEps: positiveNumber(r, 'rms_norm_eps', file, 1e-6),
    ropeTheta: positiveNumber(r, 'rope_theta', file, 10000),
    ropeScaling: parseRopeScaling(r.rope_scaling, file),
    tieWordEmbeddings: r.tie_word_embeddings === undefined ? false : Boolean(r.tie_word_embeddings),
    attentionBias: family.attentionBias(r),
    mlpBias: Boolean(r.mlp_bias),
    hiddenAct: 'silu',
    bosTokenId: bos === undefined || bos === null ? undefined : (bos as number),
    eosTokenIds,
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
