import { as1D, as2D, linear, tf } from '../../backend.ts';
import type { ForwardHooks, HookContext, LinearModule } from '../../hooks.ts';
import type { LlamaModel } from '../../llama/llama.ts';
import type { Rng } from '../../random.ts';
import { moduleStateKey } from '../keys.ts';
import { checkAtMost, fieldAt } from '../fields.ts';
import type { AdapterTensor, CreateContext, DeclareContext, DeclaredTensor, MethodInstance } from '../method.ts';
import { MergedWeights } from '../merged-weights.ts';
import { dropout, filledVariable, uniformValues, normalValues, variableFrom } from '../ops.ts';
import type { ModuleInfo } from '../targets.ts';
import { selectModules } from '../targets.ts';
import type { LoraConfig } from './config.ts';
import { loraScaling } from './config.ts';
import { doraDelta, doraMergedWeight, doraWeightNorm } from './dora.ts';
import { projectLoraFaGradient } from './lora-fa.ts';

/**
 * LoRA's state per module by PEFT's names (LoraLayer.adapter_layer_names): lora_A and lora_B
 * are Linear layers, saved with `.weight`; DoRA's magnitude is saved bare (PEFT strips the
 * `.weight` of its DoraLinearLayer to keep the older key).
 */
export const LORA_STATE = { A: ['lora_A', 'weight'], B: ['lora_B', 'weight'], magnitude: ['lora_magnitude_vector'] } as const;

/**
 * The tensors LoraLayers creates, from the configuration and the model's shapes alone. The rank
 * may be at most the widest dimension (in or out features) of the modules it targets: B A has
 * rank at most min(in, out), so a larger r adds parameters and no expressiveness, and every
 * adapter PEFT writes for a real model is far below it.
 */
export function declareLora(model: LlamaModel, config: LoraConfig, ctx: DeclareContext): DeclaredTensor[] {
  const targets = selectModules(model, config.targetModules, config.layersToTransform, {
    targets: fieldAt(ctx.file, 'target_modules', 'targetModules'),
    layers: fieldAt(ctx.file, 'layers_to_transform', 'layersToTransform'),
  });
  const widest = targets.reduce((w, t) => Math.max(w, t.inFeatures, t.outFeatures), 0);
  checkAtMost(fieldAt(ctx.file, 'r', 'r'), config.r, widest, 'the widest in or out features of the modules it targets; B A cannot have a higher rank');
  const { r } = config;
  const out: DeclaredTensor[] = [];
  for (const { path, inFeatures: n, outFeatures: m } of targets) {
    out.push({ key: moduleStateKey(path, ...LORA_STATE.A), shape: [r, n] }, { key: moduleStateKey(path, ...LORA_STATE.B), shape: [m, r] });
    if (config.useDora) out.push({ key: moduleStateKey(path, ...LORA_STATE.magnitude), shape: [m] });
  }
  return out;
}

interface LoraModule {
  info: ModuleInfo;
  a: tf.Variable; // [r, in]
  b: tf.Variable; // [out, r]
  magnitude?: tf.Variable; // [out], DoRA
}

export interface LoraVariant {
  /** LoRA-FA: A stays at its initial value; only B (and DoRA's magnitude) train. */
  freezeA: boolean;
}

export class LoraLayers implements MethodInstance {
  readonly numVirtualTokens = 0;
  readonly state: AdapterTensor[] = [];
  readonly claims: string[];
  readonly hooks: ForwardHooks;
  private readonly modules = new Map<string, LoraModule>();
  private readonly scaling: number;
  private readonly rng: Rng;
  private readonly mergedWeights: MergedWeights;
  readonly projectGradients?: (grads: Map<string, tf.Tensor>) => void;

  constructor(
    private readonly model: LlamaModel,
    private readonly config: LoraConfig,
    ctx: CreateContext,
    variant: LoraVariant,
  ) {
    this.rng = ctx.rng;
    this.mergedWeights = new MergedWeights(model);
    this.scaling = loraScaling(config);
    const fromFile = !!ctx.fromFile;
    const targets = selectModules(model, config.targetModules, config.layersToTransform, {
      targets: { field: 'targetModules' },
      layers: { field: 'layersToTransform' },
    });
    const { r } = config;
    for (const info of targets) {
      const { inFeatures: n, outFeatures: m } = info;
      // PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in)); gaussian is normal_(std=1/r).
      const aValues = config.initLoraWeights === 'gaussian' ? normalValues(this.rng, r * n, 1 / r) : uniformValues(this.rng, r * n, 1 / Math.sqrt(n));
      const a = variableFrom(aValues, [r, n], !variant.freezeA);
      const b = config.initLoraWeights === false ? variableFrom(uniformValues(this.rng, m * r, 1 / Math.sqrt(r)), [m, r], true) : filledVariable([m, r], 0, true);
      const mod: LoraModule = { info, a, b };
      this.state.push({ key: moduleStateKey(info.path, ...LORA_STATE.A), variable: a, trainable: !variant.freezeA });
      this.state.push({ key: moduleStateKey(info.path, ...LORA_STATE.B), variable: b, trainable: true });
      if (config.useDora) {
        const norm = fromFile ? tf.zeros([m]) : doraWeightNorm(this.weight(info), as2D(a), as2D(b), this.scaling);
        mod.magnitude = tf.variable(norm, true);
        norm.dispose();
        this.state.push({ key: moduleStateKey(info.path, ...LORA_STATE.magnitude), variable: mod.magnitude, trainable: true });
      }
      this.modules.set(info.path, mod);
    }
    this.claims = targets.map((t) => t.weightName);
    if (variant.freezeA) this.projectGradients = (grads) => this.projectLoraFa(grads);
    this.hooks = { linear: (module, x, base, hookCtx) => this.linear(module, x, base, hookCtx) };
  }

  private weight(info: ModuleInfo): tf.Tensor2D {
    return as2D(this.model.weight(info.weightName));
  }

  private linear(module: LinearModule, x: tf.Tensor2D, base: (x: tf.Tensor2D) => tf.Tensor2D, ctx: HookContext): tf.Tensor2D {
    const mod = this.modules.get(module.path);
    if (!mod || this.mergedWeights.active) return base(x);
    const y = base(x);
    const xd = dropout(x, this.config.loraDropout, ctx.training, this.rng);
    const a = as2D(mod.a);
    const b = as2D(mod.b);
    const lora: tf.Tensor2D = linear(linear(xd, a), b);
    if (!mod.magnitude) return tf.add(y, tf.mul(lora, this.scaling)) as tf.Tensor2D;
    const w = module.weight;
    // Without active dropout PEFT reuses the base result less its bias; with it, x W^T is recomputed on the dropped-out x.
    const baseNoBias: tf.Tensor2D = xd === x ? (module.bias ? (tf.sub(y, module.bias) as tf.Tensor2D) : y) : linear(xd, w);
    const norm = doraWeightNorm(w, a, b, this.scaling);
    return tf.add(y, doraDelta(baseNoBias, lora, as1D(mod.magnitude), norm, this.scaling)) as tf.Tensor2D;
  }

  /** LoRA-FA: B's gradient times (1/s^2) pinv(A A^T + δI), as PEFT's LoraFAOptimizer does before its update. */
  private projectLoraFa(grads: Map<string, tf.Tensor>): void {
    for (const mod of this.modules.values()) {
      const key = moduleStateKey(mod.info.path, ...LORA_STATE.B);
      const g = grads.get(key);
      if (!g) continue;
      grads.set(key, projectLoraFaGradient(g, mod.a, this.scaling));
      g.dispose();
    }
  }

  get merged(): boolean {
    return this.mergedWeights.active;
  }

  merge(): void {
    if (this.merged) return;
    for (const mod of this.modules.values()) {
      const a = as2D(mod.a);
      const b = as2D(mod.b);
      this.mergedWeights.replace(mod.info.weightName, (w) =>
        mod.magnitude
          ? doraMergedWeight(w as tf.Tensor2D, a, b, as1D(mod.magnitude), this.scaling)
          : tf.add(w, tf.mul(tf.matMul(b, a), this.scaling)),
      );
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
