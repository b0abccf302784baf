// The ONNX graph of one batched serving step (Punica's and S-LoRA's batched LoRA on one
// backbone): B sequences, each adding S positions (padded) on top of its own P cached ones
// (padded), each with its own adapter. Every base projection is one Gemm over all B·S rows;
// each module then adds (x Aᵀ ⊙ sel) Bᵀ, where A and B stack the LoRA factors of every
// adapter in the batch along the rank axis (B pre-scaled) and `sel` keeps, per row, only
// its own adapter's rank columns: the other adapters contribute exact zeros. Rope tables
// [B, S, headDim] and the additive mask [B, group·S, P + S] are per row, so rows at
// different positions, and padding, share one run. Outputs the logits at each row's last
// real position and the keys and values of the new positions, [B, kvHeads, S, headDim].
import type { ModelConfig } from '../config.ts';
import { LINEAR_MODULES } from '../hooks.ts';
import type { LinearModuleName } from '../hooks.ts';
import { GraphBuilder } from './graph.ts';
import type { WeightArrays } from './llama-graphs.ts';
import { modulePath } from './llama-graphs.ts';
import type { OnnxGraph } from './onnx-proto.ts';
import { ONNX_FLOAT, ONNX_INT32, ONNX_INT64 } from './onnx-proto.ts';

export const servingPastName = (layer: number, kv: 'k' | 'v'): string => `past.${layer}.${kv}`;
export const servingNewName = (layer: number, kv: 'k' | 'v'): string => `new.${layer}.${kv}`;
/** The stacked factors of one module path: A [K, in], B [out, K]. */
export const servingLoraNames = (path: string): { a: string; b: string } => ({ a: `${path}.lora_A`, b: `${path}.lora_B` });
/** The row selection of one module name: [B·S, K]. */
export const servingSelName = (name: LinearModuleName): string => `lora_sel.${name}`;

export function servingStepGraph(config: ModelConfig, weights: WeightArrays): OnnxGraph {
  const g = new GraphBuilder('serving_step');
  const { numAttentionHeads: nH, numKeyValueHeads: nKv, headDim: hd, hiddenSize: d } = config;
  const grp = nH / nKv;
  const held = new Set<string>();
  const w = (name: string): string => {
    if (!held.has(name)) {
      const a = weights.get(name);
      if (!a) throw new Error(`weight ${name} is missing`);
      g.weight(name, a.data, a.shape);
      held.add(name);
    }
    return name;
  };
  const ids = g.input('input_ids', ONNX_INT32, ['batch', 'seq']);
  const cos = g.input('cos', ONNX_FLOAT, ['batch', 'seq', hd]);
  const sin = g.input('sin', ONNX_FLOAT, ['batch', 'seq', hd]);
  const mask = g.input('mask', ONNX_FLOAT, ['batch', 'group_seq', 'total']);
  const lastRows = g.input('last_rows', ONNX_INT64, ['batch']);
  const sel = new Map<LinearModuleName, string>(LINEAR_MODULES.map((m) => [m, g.input(servingSelName(m), ONNX_FLOAT, ['tokens', `k_${m}`])]));
  const bs = g.op('Shape', [ids]);
  const dimsCache = new Map<string, string>();
  const dims = (rest: number[]): string => {
    let v = dimsCache.get(rest.join(','));
    if (!v) {
      v = g.op('Concat', [bs, g.ints(rest)], { axis: 0 });
      dimsCache.set(rest.join(','), v);
    }
    return v;
  };
  // The tables broadcast over heads: [B, 1, 1, S, hd] for queries [B, nKv, g, S, hd], [B, 1, S, hd] for keys.
  const cosQ = g.op('Unsqueeze', [cos, g.ints([1, 2])]);
  const sinQ = g.op('Unsqueeze', [sin, g.ints([1, 2])]);
  const cosK = g.op('Unsqueeze', [cos, g.ints([1])]);
  const sinK = g.op('Unsqueeze', [sin, g.ints([1])]);
  const mask4 = g.op('Unsqueeze', [mask, g.ints([1])]);
  const rope = (x: string, c: string, s: string): string => {
    const [x1, x2] = g.node('Split', [x], { axis: -1 }, 2);
    return g.add(g.mul(x, c), g.mul(g.op('Concat', [g.op('Neg', [x2]), x1], { axis: -1 }), s));
  };
  const rmsNorm = (x: string, weight: string): string => {
    const ms = g.meanKeep(g.mul(x, x), [-1]);
    const r = g.op('Reciprocal', [g.op('Sqrt', [g.add(ms, g.scalar(config.rmsNormEps))])]);
    return g.mul(g.mul(x, r), w(weight));
  };
  const linear = (layer: number, name: LinearModuleName, x: string): string => {
    const path = modulePath(layer, name);
    const weight = weights.get(`${path}.weight`);
    if (!weight) throw new Error(`weight ${path}.weight is missing`);
    const inputs = [x, w(`${path}.weight`)];
    if (weights.has(`${path}.bias`)) inputs.push(w(`${path}.bias`));
    const y = g.op('Gemm', inputs, { transB: 1 });
    const names = servingLoraNames(path);
    g.input(names.a, ONNX_FLOAT, [`k_${name}`, weight.shape[1]]);
    g.input(names.b, ONNX_FLOAT, [weight.shape[0], `k_${name}`]);
    const u = g.mul(g.op('Gemm', [x, names.a], { transB: 1 }), sel.get(name) as string);
    return g.op('Gemm', [u, names.b, y], { transB: 1 });
  };
  let x = g.reshape(g.op('Gather', [w('model.embed_tokens.weight'), ids]), [-1, d]);
  for (let i = 0; i < config.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    const n1 = rmsNorm(x, `${p}.input_layernorm.weight`);
    const qRows = linear(i, 'q_proj', n1);
    const kRows = linear(i, 'k_proj', n1);
    const vRows = linear(i, 'v_proj', n1);
    const q5 = g.transpose(g.op('Reshape', [qRows, dims([nKv, grp, hd])]), [0, 2, 3, 1, 4]);
    const q = g.reshape(rope(q5, cosQ, sinQ), [0, 0, -1, hd]);
    const kNew = rope(g.transpose(g.op('Reshape', [kRows, dims([nKv, hd])]), [0, 2, 1, 3]), cosK, sinK);
    const vNew = g.transpose(g.op('Reshape', [vRows, dims([nKv, hd])]), [0, 2, 1, 3]);
    for (const [kv, value] of [['k', kNew], ['v', vNew]] as const) {
      g.input(servingPastName(i, kv), ONNX_FLOAT, ['batch', nKv, 'past', hd]);
      g.alias(value, servingNewName(i, kv));
      g.output(servingNewName(i, kv), ONNX_FLOAT, ['batch', nKv, 'seq', hd]);
    }
    const k = g.op('Concat', [servingPastName(i, 'k'), kNew], { axis: 2 });
    const v = g.op('Concat', [servingPastName(i, 'v'), vNew], { axis: 2 });
    const scores = g.add(g.mul(g.matmul(q, g.transpose(k, [0, 1, 3, 2])), g.scalar(1 / Math.sqrt(hd))), mask4);
    const ctx4 = g.matmul(g.op('Softmax', [scores], { axis: -1 }), v);
    const merged = g.reshape(g.transpose(g.reshape(ctx4, [0, 0, grp, -1, hd]), [0, 3, 1, 2, 4]), [-1, nH * hd]);
    const h = g.add(x, linear(i, 'o_proj', merged));
    const n2 = rmsNorm(h, `${p}.post_attention_layernorm.weight`);
    const gate = linear(i, 'gate_proj', n2);
    const act = g.mul(g.mul(gate, g.op('Sigmoid', [gate])), linear(i, 'up_proj', n2));
    x = g.add(h, linear(i, 'down_proj', act));
  }
  const last = g.op('Gather', [x, lastRows], { axis: 0 });
  const head = config.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight';
  g.alias(g.op('Gemm', [rmsNorm(last, 'model.norm.weight'), w(head)], { transB: 1 }), 'logits');
  g.output('logits', ONNX_FLOAT, ['batch', config.vocabSize]);
  return g.build();
}
