import { tf } from '../../backend.ts';
import type { ForwardHooks, LinearModule } from '../../hooks.ts';
import type { LlamaModel } from '../../llama/llama.ts';
import { moduleStateKey } from '../keys.ts';
import { fieldAt } from '../fields.ts';
import type { AdapterTensor, CreateContext, DeclareContext, DeclaredTensor, MethodInstance } from '../method.ts';
import { MergedWeights } from '../merged-weights.ts';
import { filledVariable, normalValues, variableFrom } from '../ops.ts';
import type { ModuleInfo } from '../targets.ts';
import { matchesTarget, selectModules } from '../targets.ts';
import type { Ia3Config } from './config.ts';

/** (IA)^3's state per module by PEFT's name: ia3_l, [out, 1] scaling the output or [1, in] scaling the input (feedforward). */
export const IA3_STATE = { scale: 'ia3_l' } as const;

/** The tensors Ia3Layers creates (one vector per module, no size of its own to bound), from the configuration and the model's shapes alone. */
export function declareIa3(model: LlamaModel, config: Ia3Config, ctx: DeclareContext): DeclaredTensor[] {
  const targets = selectModules(model, config.targetModules, config.layersToTransform, {
    targets: fieldAt(ctx.file, 'target_modules', 'targetModules'),
    layers: fieldAt(ctx.file, 'layers_to_transform', 'layersToTransform'),
  });
  return targets.map((info) => ({
    key: moduleStateKey(info.path, IA3_STATE.scale),
    shape: matchesTarget(info.path, config.feedforwardModules) ? [1, info.inFeatures] : [info.outFeatures, 1],
  }));
}

interface Ia3Module {
  info: ModuleInfo;
  feedforward: boolean;
  scale: tf.Variable;
}

export class Ia3Layers implements MethodInstance {
  readonly numVirtualTokens = 0;
  readonly state: AdapterTensor[] = [];
  readonly claims: string[] = [];
  readonly hooks: ForwardHooks;
  private readonly modules = new Map<string, Ia3Module>();
  private readonly mergedWeights: MergedWeights;

  constructor(
    private readonly model: LlamaModel,
    config: Ia3Config,
    ctx: CreateContext,
  ) {
    this.mergedWeights = new MergedWeights(model);
    const targets = selectModules(model, config.targetModules, config.layersToTransform, { targets: { field: 'targetModules' }, layers: { field: 'layersToTransform' } });
    for (const info of targets) {
      const feedforward = matchesTarget(info.path, config.feedforwardModules);
      const shape = feedforward ? [1, info.inFeatures] : [info.outFeatures, 1];
      const size = shape[0] * shape[1];
      const scale = config.initIa3Weights ? filledVariable(shape, 1, true) : variableFrom(normalValues(ctx.rng, size, 1), shape, true);
      this.state.push({ key: moduleStateKey(info.path, IA3_STATE.scale), variable: scale, trainable: true });
      this.modules.set(info.path, { info, feedforward, scale });
      this.claims.push(info.weightName);
      // Merging an output scale scales the bias as well.
      if (!feedforward && info.biasName) this.claims.push(info.biasName);
    }
    this.hooks = { linear: (module, x, base) => this.linear(module, x, base) };
  }

  private linear(module: LinearModule, x: tf.Tensor2D, base: (x: tf.Tensor2D) => tf.Tensor2D): tf.Tensor2D {
    const mod = this.modules.get(module.path);
    if (!mod || this.mergedWeights.active) return base(x);
    if (mod.feedforward) return base(tf.mul(x, mod.scale) as tf.Tensor2D);
    return tf.mul(base(x), tf.reshape(mod.scale, [1, -1])) as tf.Tensor2D;
  }

  get merged(): boolean {
    return this.mergedWeights.active;
  }

  merge(): void {
    if (this.merged) return;
    for (const mod of this.modules.values()) {
      // [out, 1] scales rows (outputs), [1, in] scales columns (inputs): PEFT's torch.mul(W, ia3_l).
      this.mergedWeights.replace(mod.info.weightName, (w) => tf.mul(w, mod.scale));
      const biasName = !mod.feedforward ? mod.info.biasName : undefined;
      if (biasName) this.mergedWeights.replace(biasName, (bias) => tf.mul(bias, tf.reshape(mod.scale, [-1])));
    }
  }

  unmerge(): void {
    this.mergedWeights.restore();
  }

  dispose(): void {
    this.unmerge();
    for (const s of this.state) s.variable.dispose();
    this.modules.clear();
  }
}
