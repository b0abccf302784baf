import { linear, tf } from '../../backend.ts';
import type { ForwardHooks, SublayerKind } from '../../hooks.ts';
import type { LlamaModel } from '../../llama/llama.ts';
import { moduleStateKey } from '../keys.ts';
import { checkAtMost, fieldAt } from '../fields.ts';
import type { AdapterTensor, CreateContext, DeclareContext, DeclaredTensor, MethodInstance } from '../method.ts';
import { filledVariable, uniformValues, variableFrom } from '../ops.ts';
import { resolveLayers } from '../targets.ts';
import type { BottleneckConfig } from './config.ts';

/**
 * The state of one adapter, PEFT-style: two Linear layers on the sublayer's module
 * (`model.layers.i.self_attn` or `model.layers.i.mlp`), adapter_down [size, hidden] and
 * adapter_up [hidden, size], each with `.weight` and `.bias`.
 */
export const BOTTLENECK_STATE = { down: 'adapter_down', up: 'adapter_up', params: ['weight', 'bias'] } as const;

const MODULE_OF: Record<SublayerKind, string> = { attention: 'self_attn', mlp: 'mlp' };

interface Bottleneck {
  downW: tf.Variable;
  downB: tf.Variable;
  upW: tf.Variable;
  upB: tf.Variable;
}

/**
 * The adapters BottleneckAdapters creates, from the configuration and the model's shapes alone.
 * A bottleneck is narrower than what it adapts: its size may be at most the model's widest
 * dimension, max(hidden_size, intermediate_size) (Houlsby's and Pfeiffer's adapters use
 * hidden / 16 to hidden / 2).
 */
export function declareBottleneck(model: LlamaModel, config: BottleneckConfig, ctx: DeclareContext): DeclaredTensor[] {
  const { hiddenSize: hidden, intermediateSize } = model.config;
  const layers = resolveLayers(model, config.layersToTransform, fieldAt(ctx.file, 'layers_to_transform', 'layersToTransform'));
  const widest = Math.max(hidden, intermediateSize);
  checkAtMost(fieldAt(ctx.file, 'bottleneck_size', 'bottleneckSize'), config.bottleneckSize, widest, "the model's widest dimension, max(hidden_size, intermediate_size)");
  const size = config.bottleneckSize;
  const [w, b] = BOTTLENECK_STATE.params;
  const out: DeclaredTensor[] = [];
  for (const layer of layers) {
    for (const kind of config.sublayers) {
      const path = `model.layers.${layer}.${MODULE_OF[kind]}`;
      out.push(
        { key: moduleStateKey(path, BOTTLENECK_STATE.down, w), shape: [size, hidden] },
        { key: moduleStateKey(path, BOTTLENECK_STATE.down, b), shape: [size] },
        { key: moduleStateKey(path, BOTTLENECK_STATE.up, w), shape: [hidden, size] },
        { key: moduleStateKey(path, BOTTLENECK_STATE.up, b), shape: [hidden] },
      );
    }
  }
  return out;
}

function activate(x: tf.Tensor, kind: BottleneckConfig['nonLinearity']): tf.Tensor {
  switch (kind) {
    case 'relu':
      return tf.relu(x);
    case 'silu':
      return tf.mul(x, tf.sigmoid(x));
    case 'tanh':
      return tf.tanh(x);
    case 'gelu': // tanh approximation
      return tf.mul(tf.mul(x, 0.5), tf.add(1, tf.tanh(tf.mul(Math.sqrt(2 / Math.PI), tf.add(x, tf.mul(0.044715, tf.pow(x, 3)))))));
  }
}

export class BottleneckAdapters implements MethodInstance {
  readonly numVirtualTokens = 0;
  readonly state: AdapterTensor[] = [];
  readonly claims = [];
  readonly hooks: ForwardHooks;
  readonly mergeBlocker = 'a bottleneck adapter is nonlinear and cannot be folded into weights';
  private readonly adapters = new Map<string, Bottleneck>();

  constructor(
    model: LlamaModel,
    private readonly config: BottleneckConfig,
    ctx: CreateContext,
  ) {
    const hidden = model.config.hiddenSize;
    const size = config.bottleneckSize;
    for (const layer of resolveLayers(model, config.layersToTransform, { field: 'layersToTransform' })) {
      for (const kind of config.sublayers) {
        const path = `model.layers.${layer}.${MODULE_OF[kind]}`;
        // Down as nn.Linear's default weight init; up zero so the adapter starts as the identity.
        const a: Bottleneck = {
          downW: variableFrom(uniformValues(ctx.rng, size * hidden, 1 / Math.sqrt(hidden)), [size, hidden], true),
          downB: filledVariable([size], 0, true),
          upW: filledVariable([hidden, size], 0, true),
          upB: filledVariable([hidden], 0, true),
        };
        const [w, b] = BOTTLENECK_STATE.params;
        this.state.push(
          { key: moduleStateKey(path, BOTTLENECK_STATE.down, w), variable: a.downW, trainable: true },
          { key: moduleStateKey(path, BOTTLENECK_STATE.down, b), variable: a.downB, trainable: true },
          { key: moduleStateKey(path, BOTTLENECK_STATE.up, w), variable: a.upW, trainable: true },
          { key: moduleStateKey(path, BOTTLENECK_STATE.up, b), variable: a.upB, trainable: true },
        );
        this.adapters.set(`${layer}:${kind}`, a);
      }
    }
    this.hooks = {
      sublayer: (layer, kind, input, output) => {
        const a = this.adapters.get(`${layer}:${kind}`);
        if (!a) return output;
        const src = this.config.placement === 'serial' ? output : input;
        const [bs, s, d] = src.shape;
        const rows = tf.reshape(src, [bs * s, d]);
        const down = activate(tf.add(linear(rows, a.downW), a.downB), this.config.nonLinearity);
        const up = tf.add(linear(down, a.upW), a.upB);
        return tf.add(output, tf.mul(tf.reshape(up, [bs, s, d]), this.config.scaling)) as tf.Tensor3D;
      },
    };
  }

  merge(): void {
    throw new Error('unreachable: the adapter checks mergeBlocker first');
  }

  unmerge(): void {}

  dispose(): void {
    for (const s of this.state) s.variable.dispose();
    this.adapters.clear();
  }
}
