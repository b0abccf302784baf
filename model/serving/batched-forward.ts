// One forward step for many sequences at once, each with its own KV cache and its own
// adapter (Punica's and S-LoRA's batched LoRA): the tokens of every sequence are stacked
// into one [tokens, hidden] matrix, so each base projection runs once for the whole batch;
// an adapter's linear hook then runs on its own rows only (unmerged), and attention runs
// within each sequence against its own cache. Per row it computes what LlamaModel.forward
// computes, op for op, so greedy tokens equal generate()'s.
import { as1D, as2D, batchMatMul, linear, tf, transposeLast } from '../backend.ts';
import { ModelError } from '../errors.ts';
import type { ForwardHooks, HookContext, LinearModule, LinearModuleName } from '../hooks.ts';
import type { KvCache, LlamaModel } from '../llama/llama.ts';
import { maskedSoftmax, rmsNorm, rope, swiglu } from '../llama/ops.ts';
import { ropeInverseFrequencies, ropeTables } from '../llama/rope.ts';

/** One sequence of a batched step: the tokens it adds, its cache, and its adapter's hooks. */
export interface BatchRow {
  ids: readonly number[];
  cache: KvCache;
  /** Only `linear` hooks can run batched (LoRA, LoRA-FA, DoRA); see checkServableHooks. */
  hooks?: ForwardHooks;
}

const MASKED = -1e9;

/** Throws unless the hooks change only linear projections (what a batched step can apply per row group). */
export function checkServableHooks(hooks: ForwardHooks): void {
  for (const name of ['sublayer', 'embeddings'] as const) {
    if (hooks[name] !== undefined) throw new ModelError('TANDEM_INPUT_INVALID', `an adapter with a ${name} hook cannot be served batched; only methods that change linear projections (LoRA, LoRA-FA, DoRA) can`, { field: 'peft_type' });
  }
}

/** Bytes the KV cache of `tokens` positions takes (keys and values of every block, float32). */
export function kvBytesPerToken(model: LlamaModel): number {
  const { numHiddenLayers, numKeyValueHeads, headDim } = model.config;
  return 2 * numHiddenLayers * numKeyValueHeads * headDim * 4;
}

interface Segment {
  start: number;
  length: number;
  hooks?: ForwardHooks;
}

/** Contiguous rows that share hooks (the caller orders rows by adapter so that groups are few). */
function segmentsOf(rows: readonly BatchRow[]): Segment[] {
  const out: Segment[] = [];
  let start = 0;
  for (const row of rows) {
    const last = out.at(-1);
    if (last !== undefined && last.hooks === row.hooks) last.length += row.ids.length;
    else out.push({ start, length: row.ids.length, hooks: row.hooks });
    start += row.ids.length;
  }
  return out;
}

function causalMask(seq: number, past: number, groupSize: number): tf.Tensor2D {
  const total = past + seq;
  const m = new Float32Array(seq * total);
  for (let i = 0; i < seq; i++) for (let j = past + i + 1; j < total; j++) m[i * total + j] = MASKED;
  const mask = tf.tensor2d(m, [seq, total]);
  return groupSize === 1 ? mask : tf.tile(mask, [groupSize, 1]);
}

/**
 * Runs the new tokens of every row through the whole model, appending to each row's cache,
 * and returns each row's logits at its last new token.
 */
export function batchedLastLogits(model: LlamaModel, rows: readonly BatchRow[]): Float32Array[] {
  if (rows.length === 0) return [];
  for (const row of rows) {
    if (row.ids.length === 0) throw new ModelError('TANDEM_INPUT_INVALID', 'a row of a batched step has no tokens', { field: 'input_ids' });
    if (row.hooks !== undefined) checkServableHooks(row.hooks);
    if (row.cache.length + row.ids.length > model.config.maxPositionEmbeddings) {
      throw new ModelError('TANDEM_INPUT_INVALID', `a row reaches position ${row.cache.length + row.ids.length}, over max_position_embeddings ${model.config.maxPositionEmbeddings}`, { field: 'input_ids' });
    }
  }
  const config = model.config;
  const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd } = config;
  const segments = segmentsOf(rows);
  const invFreq = ropeInverseFrequencies(config);
  const logits = tf.tidy(() => {
    const allIds = rows.flatMap((r) => [...r.ids]);
    let h = tf.gather(model.weight('model.embed_tokens.weight'), tf.tensor1d(allIds, 'int32')) as tf.Tensor2D;
    const tables = rows.map((r) => {
      const { cos, sin } = ropeTables(invFreq, r.cache.length, r.ids.length);
      return { cos: tf.tensor2d(cos, [r.ids.length, hd]), sin: tf.tensor2d(sin, [r.ids.length, hd]), mask: causalMask(r.ids.length, r.cache.length, nH / nKv) };
    });
    const project = (layer: number, group: 'self_attn' | 'mlp', name: LinearModuleName, x: tf.Tensor2D): tf.Tensor2D => {
      const path = `model.layers.${layer}.${group}.${name}`;
      const weight = as2D(model.weight(`${path}.weight`));
      const bias = as1D(model.weights.get(`${path}.bias`));
      const y0 = linear(x, weight);
      const y = bias ? (tf.add(y0, bias) as tf.Tensor2D) : y0;
      if (segments.every((s) => s.hooks?.linear === undefined)) return y;
      const module: LinearModule = { path, layer, name, weight, bias, inFeatures: weight.shape[1], outFeatures: weight.shape[0] };
      const parts = segments.map((s) => {
        const ys = segments.length === 1 ? y : tf.slice(y, [s.start, 0], [s.length, weight.shape[0]]);
        const hook = s.hooks?.linear;
        if (hook === undefined) return ys;
        const xs = segments.length === 1 ? x : tf.slice(x, [s.start, 0], [s.length, weight.shape[1]]);
        const ctx: HookContext = { training: false, pastLength: 0 };
        return hook(module, xs as tf.Tensor2D, () => ys as tf.Tensor2D, ctx);
      });
      return parts.length === 1 ? parts[0] : (tf.concat(parts, 0) as tf.Tensor2D);
    };
    for (let i = 0; i < config.numHiddenLayers; i++) {
      const input = h;
      h = tf.tidy(() => {
        const p = `model.layers.${i}`;
        const n1 = rmsNorm(input, model.weight(`${p}.input_layernorm.weight`), config.rmsNormEps) as tf.Tensor2D;
        const q = project(i, 'self_attn', 'q_proj', n1);
        const k = project(i, 'self_attn', 'k_proj', n1);
        const v = project(i, 'self_attn', 'v_proj', n1);
        let offset = 0;
        const merged = rows.map((row, r) => {
          const s = row.ids.length;
          const heads = (t: tf.Tensor2D, n: number): tf.Tensor4D => tf.transpose(tf.reshape(tf.slice(t, [offset, 0], [s, n * hd]), [1, s, n, hd]), [0, 2, 1, 3]) as tf.Tensor4D;
          const { cos, sin, mask } = tables[r];
          const qr = rope(heads(q, nH), cos, sin);
          let kr = rope(heads(k, nKv), cos, sin);
          let vr = heads(v, nKv);
          offset += s;
          const past = row.cache.layers.get(i);
          if (past) {
            kr = tf.concat([past.k, kr], 2);
            vr = tf.concat([past.v, vr], 2);
            tf.dispose([past.k, past.v]);
          }
          row.cache.layers.set(i, { k: tf.keep(kr), v: tf.keep(vr) });
          const t = kr.shape[2];
          const g = nH / nKv;
          const qg = tf.reshape(qr, [nKv, g * s, hd]) as tf.Tensor3D;
          const kg = tf.reshape(kr, [nKv, t, hd]) as tf.Tensor3D;
          const vg = tf.reshape(vr, [nKv, t, hd]) as tf.Tensor3D;
          const probs = maskedSoftmax(batchMatMul(qg, transposeLast(kg) as tf.Tensor3D), 1 / Math.sqrt(hd), mask);
          const ctx = tf.reshape(batchMatMul(probs as tf.Tensor3D, vg), [1, nH, s, hd]);
          return tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [s, nH * hd]) as tf.Tensor2D;
        });
        const attnIn = merged.length === 1 ? merged[0] : (tf.concat(merged, 0) as tf.Tensor2D);
        const x = tf.add(input, project(i, 'self_attn', 'o_proj', attnIn)) as tf.Tensor2D;
        const n2 = rmsNorm(x, model.weight(`${p}.post_attention_layernorm.weight`), config.rmsNormEps) as tf.Tensor2D;
        const act = swiglu(project(i, 'mlp', 'gate_proj', n2), project(i, 'mlp', 'up_proj', n2)) as tf.Tensor2D;
        return tf.add(x, project(i, 'mlp', 'down_proj', act)) as tf.Tensor2D;
      });
    }
    let end = 0;
    const lastRows = rows.map((r) => (end += r.ids.length) - 1);
    const last = tf.gather(h, tf.tensor1d(lastRows, 'int32')) as tf.Tensor2D;
    const n = rmsNorm(last, model.weight('model.norm.weight'), config.rmsNormEps);
    return linear(n, as2D(model.headWeight()));
  });
  for (const row of rows) row.cache.length += row.ids.length;
  const values = logits.dataSync() as Float32Array;
  logits.dispose();
  const vocab = config.vocabSize;
  return rows.map((_, r) => values.slice(r * vocab, (r + 1) * vocab));
}
