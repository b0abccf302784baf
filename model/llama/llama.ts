import { as1D, as2D, batchMatMul, linear, tf, transposeLast } from '../backend.ts';
import type { ModelConfig } from '../config.ts';
import { expectedTensorShapes } from '../config.ts';
import { ModelError } from '../errors.ts';
import type { ForwardHooks, HookContext, LinearModule, LinearModuleName } from '../hooks.ts';
import { maskedSoftmax, rmsNorm, rope, swiglu } from './ops.ts';
import { ropeInverseFrequencies, ropeTables } from './rope.ts';

/** Keys and values already computed for earlier positions, per layer, [batch, kvHeads, past, headDim]. */
export class KvCache {
  readonly layers = new Map<number, { k: tf.Tensor4D; v: tf.Tensor4D }>();
  length = 0;

  dispose(): void {
    for (const { k, v } of this.layers.values()) tf.dispose([k, v]);
    this.layers.clear();
    this.length = 0;
  }
}

export interface ForwardOptions {
  hooks?: ForwardHooks;
  cache?: KvCache;
  training?: boolean;
  /** Position of the first token; defaults to the cache length. */
  positionOffset?: number;
}

const MASKED = -1e9;

/**
 * A LLaMA-family decoder (llama, mistral, qwen2) over tfjs. Weights are held by Hugging Face
 * name; a model may hold only some of them (the cut), and runs any contiguous range of blocks.
 */
export class LlamaModel {
  readonly config: ModelConfig;
  readonly weights: Map<string, tf.Variable>;
  private readonly invFreq: Float64Array;
  private readonly ropeCache = new Map<string, { cos: tf.Tensor2D; sin: tf.Tensor2D }>();

  constructor(config: ModelConfig, weights: Map<string, tf.Variable>) {
    this.config = config;
    this.weights = weights;
    this.invFreq = ropeInverseFrequencies(config);
  }

  /**
   * Builds a model from float32 arrays (what the checkpoint loader returns). Only the tensors
   * given are held; `only` restricts them further (e.g. to the middle blocks on the cloud).
   */
  static fromArrays(config: ModelConfig, arrays: Map<string, { shape: number[]; data: Float32Array }>, only?: (name: string) => boolean): LlamaModel {
    const expected = expectedTensorShapes(config);
    const weights = new Map<string, tf.Variable>();
    for (const [name, shape] of expected) {
      if (only && !only(name)) continue;
      const a = arrays.get(name);
      if (!a) continue;
      if (a.shape.length !== shape.length || a.shape.some((d, i) => d !== shape[i])) {
        throw new ModelError('TANDEM_TENSOR_SHAPE_MISMATCH', `expected [${shape}], got [${a.shape}]`, { tensor: name });
      }
      // tidy frees the initial tensor; variables are not tracked by it.
      weights.set(name, tf.tidy(() => tf.variable(tf.tensor(a.data, a.shape, 'float32'), false)));
    }
    return new LlamaModel(config, weights);
  }

  get numLayers(): number {
    return this.config.numHiddenLayers;
  }

  /** A held weight by Hugging Face name; a missing one is a typed error naming it. */
  weight(name: string): tf.Variable {
    const w = this.weights.get(name);
    if (!w) throw new ModelError('TANDEM_TENSOR_MISSING', 'this model part does not hold the tensor', { tensor: name });
    return w;
  }

  /** The output projection: lm_head, or the embedding when they are tied. */
  headWeight(): tf.Variable {
    return this.config.tieWordEmbeddings ? this.weight('model.embed_tokens.weight') : this.weight('lm_head.weight');
  }

  /** Token ids [batch, seq] → hidden states [batch, seq(+virtual tokens), hidden]. */
  embed(ids: tf.Tensor2D, options: ForwardOptions = {}): tf.Tensor3D {
    return tf.tidy(() => {
      const [b, s] = ids.shape;
      if (ids.dtype !== 'int32') throw new ModelError('TANDEM_INPUT_INVALID', `token ids must be int32, got ${ids.dtype}`, { field: 'input_ids' });
      const flat = tf.reshape(ids, [b * s]);
      const h = tf.reshape(tf.gather(this.weight('model.embed_tokens.weight'), flat), [b, s, this.config.hiddenSize]) as tf.Tensor3D;
      const hook = options.hooks?.embeddings;
      return hook ? hook(h, this.context(options)) : h;
    });
  }

  /** Runs blocks [start, end) on hidden states [batch, seq, hidden]. */
  blocks(h: tf.Tensor3D, start: number, end: number, options: ForwardOptions = {}): tf.Tensor3D {
    if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end > this.numLayers || start > end) {
      throw new ModelError('TANDEM_INPUT_INVALID', `block range [${start}, ${end}) is outside [0, ${this.numLayers}]`, { field: 'blocks' });
    }
    const cache = options.cache;
    const offset = options.positionOffset ?? cache?.length ?? 0;
    const seq = h.shape[1];
    const out = tf.tidy(() => {
      const { cos, sin } = this.rope(offset, seq);
      // One mask for every block: the query heads sharing a kv head are stacked along the
      // sequence axis (see attention), so the mask repeats once per head of a group.
      const groupSize = this.config.numAttentionHeads / this.config.numKeyValueHeads;
      const causal = causalMask(seq, offset);
      const mask = groupSize === 1 ? causal : tf.tile(causal, [groupSize, 1]);
      let x = h;
      // A scope per block: without a tape a block's intermediates are freed before the next
      // block runs; under one, what backward needs was kept by the tape and survives.
      for (let i = start; i < end; i++) {
        const input = x;
        x = tf.tidy(() => this.block(i, input, cos, sin, mask, options));
      }
      return x;
    });
    if (cache && end === this.numLayers) cache.length = offset + seq;
    return out;
  }

  /** Final norm and LM head: hidden states → logits [batch, seq, vocab]. Drops `dropPrefix` virtual tokens first. */
  head(h: tf.Tensor3D, dropPrefix = 0): tf.Tensor3D {
    return tf.tidy(() => {
      const [b, s, d] = h.shape;
      const x = dropPrefix > 0 ? tf.slice(h, [0, dropPrefix, 0], [b, s - dropPrefix, d]) : h;
      const n = this.rmsNorm(x, this.weight('model.norm.weight'));
      const rows = tf.reshape(n, [-1, d]) as tf.Tensor2D;
      const logits = linear(rows, as2D(this.headWeight()));
      return tf.reshape(logits, [b, s - dropPrefix, this.config.vocabSize]) as tf.Tensor3D;
    });
  }

  /** The whole model: token ids → logits for the tokens given (virtual tokens dropped). */
  forward(ids: tf.Tensor2D, options: ForwardOptions = {}): tf.Tensor3D {
    return tf.tidy(() => {
      const h0 = this.embed(ids, options);
      const prefix = h0.shape[1] - ids.shape[1];
      const h = this.blocks(h0, 0, this.numLayers, options);
      return this.head(h, prefix);
    });
  }

  /** Frees every weight and cached table. */
  dispose(): void {
    for (const w of this.weights.values()) w.dispose();
    this.weights.clear();
    for (const { cos, sin } of this.ropeCache.values()) tf.dispose([cos, sin]);
    this.ropeCache.clear();
  }

  private context(options: ForwardOptions): HookContext {
    return { training: options.training ?? false, pastLength: options.cache?.length ?? 0 };
  }

  private rope(offset: number, length: number): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
    const key = `${offset}:${length}`;
    let t = this.ropeCache.get(key);
    if (!t) {
      const { cos, sin } = ropeTables(this.invFreq, offset, length);
      const d = this.config.headDim;
      t = tf.tidy(() => ({ cos: tf.keep(tf.tensor2d(cos, [length, d])), sin: tf.keep(tf.tensor2d(sin, [length, d])) }));
      // Training reuses a few (offset, length) pairs; generation walks offsets one by one.
      if (this.ropeCache.size >= 64) {
        const [oldKey, old] = this.ropeCache.entries().next().value as [string, { cos: tf.Tensor2D; sin: tf.Tensor2D }];
        tf.dispose([old.cos, old.sin]);
        this.ropeCache.delete(oldKey);
      }
      this.ropeCache.set(key, t);
    }
    return t;
  }

  private rmsNorm(x: tf.Tensor, w: tf.Tensor): tf.Tensor {
    return rmsNorm(x, w, this.config.rmsNormEps);
  }

  private linear(layer: number, group: 'self_attn' | 'mlp', name: LinearModuleName, x: tf.Tensor2D, options: ForwardOptions): tf.Tensor2D {
    const path = `model.layers.${layer}.${group}.${name}`;
    const weight = as2D(this.weight(`${path}.weight`));
    const bias = as1D(this.weights.get(`${path}.bias`));
    const base = (input: tf.Tensor2D): tf.Tensor2D => {
      const y = linear(input, weight);
      return bias ? (tf.add(y, bias) as tf.Tensor2D) : y;
    };
    const hook = options.hooks?.linear;
    if (!hook) return base(x);
    const module: LinearModule = { path, layer, name, weight, bias, inFeatures: weight.shape[1], outFeatures: weight.shape[0] };
    return hook(module, x, base, this.context(options));
  }

  private block(i: number, x: tf.Tensor3D, cos: tf.Tensor2D, sin: tf.Tensor2D, mask: tf.Tensor2D, options: ForwardOptions): tf.Tensor3D {
    const p = `model.layers.${i}`;
    const sublayer = options.hooks?.sublayer;
    const n1 = this.rmsNorm(x, this.weight(`${p}.input_layernorm.weight`)) as tf.Tensor3D;
    let attn = this.attention(i, n1, cos, sin, mask, options);
    if (sublayer) attn = sublayer(i, 'attention', n1, attn, this.context(options));
    const h = tf.add(x, attn) as tf.Tensor3D;
    const n2 = this.rmsNorm(h, this.weight(`${p}.post_attention_layernorm.weight`)) as tf.Tensor3D;
    let mlp = this.mlp(i, n2, options);
    if (sublayer) mlp = sublayer(i, 'mlp', n2, mlp, this.context(options));
    return tf.add(h, mlp) as tf.Tensor3D;
  }

  /** `mask` is the causal mask repeated for each query head of a kv group, [group · seq, past + seq]. */
  private attention(i: number, x: tf.Tensor3D, cos: tf.Tensor2D, sin: tf.Tensor2D, mask: tf.Tensor2D, options: ForwardOptions): tf.Tensor3D {
    const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd, hiddenSize } = this.config;
    const [b, s] = x.shape;
    const rows = tf.reshape(x, [b * s, hiddenSize]) as tf.Tensor2D;
    const heads = (t: tf.Tensor2D, n: number) => tf.transpose(tf.reshape(t, [b, s, n, hd]), [0, 2, 1, 3]) as tf.Tensor4D;
    const q = rope(heads(this.linear(i, 'self_attn', 'q_proj', rows, options), nH), cos, sin);
    let k = rope(heads(this.linear(i, 'self_attn', 'k_proj', rows, options), nKv), cos, sin);
    let v = heads(this.linear(i, 'self_attn', 'v_proj', rows, options), nKv);
    const cache = options.cache;
    if (cache) {
      const past = cache.layers.get(i);
      if (past) {
        k = tf.concat([past.k, k], 2);
        v = tf.concat([past.v, v], 2);
        tf.dispose([past.k, past.v]);
      }
      cache.layers.set(i, { k: tf.keep(k), v: tf.keep(v) });
    }
    const t = k.shape[2];
    // Grouped-query attention without copying k and v: the query heads that share a kv head
    // are stacked along the sequence axis, so one batched matmul serves the whole group.
    const g = nH / nKv;
    const qg = tf.reshape(q, [b * nKv, g * s, hd]);
    const kg = tf.reshape(k, [b * nKv, t, hd]);
    const vg = tf.reshape(v, [b * nKv, t, hd]);
    const probs = maskedSoftmax(batchMatMul(qg as tf.Tensor3D, transposeLast(kg) as tf.Tensor3D), 1 / Math.sqrt(hd), mask);
    const ctx = tf.reshape(batchMatMul(probs as tf.Tensor3D, vg as tf.Tensor3D), [b, nH, s, hd]);
    const merged = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [b * s, nH * hd]) as tf.Tensor2D;
    return tf.reshape(this.linear(i, 'self_attn', 'o_proj', merged, options), [b, s, hiddenSize]) as tf.Tensor3D;
  }

  private mlp(i: number, x: tf.Tensor3D, options: ForwardOptions): tf.Tensor3D {
    const [b, s, d] = x.shape;
    const rows = tf.reshape(x, [b * s, d]) as tf.Tensor2D;
    const gate = this.linear(i, 'mlp', 'gate_proj', rows, options);
    const up = this.linear(i, 'mlp', 'up_proj', rows, options);
    const act = swiglu(gate, up) as tf.Tensor2D;
    return tf.reshape(this.linear(i, 'mlp', 'down_proj', act, options), [b, s, d]) as tf.Tensor3D;
  }
}

/** Additive causal mask [seq, past + seq]: query i (at position past + i) sees keys 0..past + i. */
function causalMask(seq: number, past: number): tf.Tensor2D {
  const total = past + seq;
  const m = new Float32Array(seq * total);
  for (let i = 0; i < seq; i++) for (let j = past + i + 1; j < total; j++) m[i * total + j] = MASKED;
  return tf.tensor2d(m, [seq, total]);
}
