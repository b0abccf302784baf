import { linear, tf } from '../../backend.ts';
import type { ForwardHooks, HookContext, LinearModule } from '../../hooks.ts';
import type { LlamaModel } from '../../llama/llama.ts';
import { Rng } from '../../random.ts';
import { moduleStateKey, sharedStateKey } from '../keys.ts';
import { checkAtMost, fieldAt } from '../fields.ts';
import type { AdapterTensor, CreateContext, DeclareContext, DeclaredTensor, MethodInstance } from '../method.ts';
import { MergedWeights } from '../merged-weights.ts';
import { dropout, filledVariable, uniformValues, variableFrom } from '../ops.ts';
import type { ModuleInfo } from '../targets.ts';
import { selectModules } from '../targets.ts';
import type { VeraConfig } from './config.ts';

/**
 * VeRA's state by PEFT's names: per module the trainable vectors vera_lambda_b [out] and
 * vera_lambda_d [r] (bare Parameters); shared by the model the frozen projections
 * vera_A [r, max in] and vera_B [max out, r], saved as base_model.vera_A / base_model.vera_B.
 */
export const VERA_STATE = { lambdaB: 'vera_lambda_b', lambdaD: 'vera_lambda_d', A: 'vera_A', B: 'vera_B' } as const;

/** The bound of PEFT's _kaiming_init for a matrix with `fanIn` columns: sqrt(6 / fan_in). */
export function veraKaimingBound(fanIn: number): number {
  return Math.sqrt(3) * (Math.SQRT2 / Math.sqrt(fanIn));
}

/** PEFT's default VeRA rank: admitted on any model, however narrow (PEFT's own tests use it on tiny models). */
export const VERA_DEFAULT_RANK = 256;

/**
 * The tensors VeraLayers creates, from the configuration and the model's shapes alone. The rank
 * of the shared random projections may be at most the widest dimension of the modules it
 * targets, or PEFT's default of 256 on a narrower model (VeRA's paper uses r up to the hidden
 * size: 1024 on RoBERTa-large and LLaMA-7B).
 */
export function declareVera(model: LlamaModel, config: VeraConfig, ctx: DeclareContext): DeclaredTensor[] {
  const targets = selectModules(model, config.targetModules, config.layersToTransform, {
    targets: fieldAt(ctx.file, 'target_modules', 'targetModules'),
    layers: fieldAt(ctx.file, 'layers_to_transform', 'layersToTransform'),
  });
  const maxIn = targets.reduce((w, t) => Math.max(w, t.inFeatures), 0);
  const maxOut = targets.reduce((w, t) => Math.max(w, t.outFeatures), 0);
  const limit = Math.max(maxIn, maxOut, VERA_DEFAULT_RANK);
  checkAtMost(fieldAt(ctx.file, 'r', 'r'), config.r, limit, `the widest in or out features of the modules it targets, or ${VERA_DEFAULT_RANK} (PEFT's default) on a narrower model`);
  const { r } = config;
  const out: DeclaredTensor[] = [
    { key: sharedStateKey(VERA_STATE.A), shape: [r, maxIn] },
    { key: sharedStateKey(VERA_STATE.B), shape: [maxOut, r] },
  ];
  for (const { path, outFeatures } of targets) {
    out.push({ key: moduleStateKey(path, VERA_STATE.lambdaB), shape: [outFeatures] }, { key: moduleStateKey(path, VERA_STATE.lambdaD), shape: [r] });
  }
  return out;
}

interface VeraModule {
  info: ModuleInfo;
  lambdaB: tf.Variable;
  lambdaD: tf.Variable;
}

export class VeraLayers implements MethodInstance {
  readonly numVirtualTokens = 0;
  readonly state: AdapterTensor[] = [];
  readonly claims: string[];
  readonly hooks: ForwardHooks;
  private readonly modules = new Map<string, VeraModule>();
  private readonly a: tf.Variable;
  private readonly b: tf.Variable;
  private readonly mergedWeights: MergedWeights;

  constructor(
    private readonly model: LlamaModel,
    private readonly config: VeraConfig,
    private readonly ctx: CreateContext,
  ) {
    this.mergedWeights = new MergedWeights(model);
    const targets = selectModules(model, config.targetModules, config.layersToTransform, { targets: { field: 'targetModules' }, layers: { field: 'layersToTransform' } });
    const { r } = config;
    const maxIn = Math.max(...targets.map((t) => t.inFeatures));
    const maxOut = Math.max(...targets.map((t) => t.outFeatures));
    // As PEFT's _kaiming_init (peft/tuners/vera/model.py): gain sqrt(2), std = gain / sqrt(fan_in),
    // bound = sqrt(3) · std = sqrt(6 / fan_in), fan_in being each matrix's second dimension.
    const proj = new Rng(config.projectionPrngKey);
    this.a = variableFrom(uniformValues(proj, r * maxIn, veraKaimingBound(maxIn)), [r, maxIn], false);
    this.b = variableFrom(uniformValues(proj, maxOut * r, veraKaimingBound(r)), [maxOut, r], false);
    this.state.push({ key: sharedStateKey(VERA_STATE.A), variable: this.a, trainable: false });
    this.state.push({ key: sharedStateKey(VERA_STATE.B), variable: this.b, trainable: false });
    for (const info of targets) {
      const lambdaB = filledVariable([info.outFeatures], 0, true);
      const lambdaD = filledVariable([r], config.dInitial, true);
      this.state.push({ key: moduleStateKey(info.path, VERA_STATE.lambdaB), variable: lambdaB, trainable: true });
      this.state.push({ key: moduleStateKey(info.path, VERA_STATE.lambdaD), variable: lambdaD, trainable: true });
      this.modules.set(info.path, { info, lambdaB, lambdaD });
    }
    this.claims = targets.map((t) => t.weightName);
    this.hooks = { linear: (module, x, base, hookCtx) => this.linear(module, x, base, hookCtx) };
  }

  private sliced(info: ModuleInfo): { a: tf.Tensor2D; b: tf.Tensor2D } {
    const r = this.config.r;
    return { a: tf.slice(this.a, [0, 0], [r, info.inFeatures]) as tf.Tensor2D, b: tf.slice(this.b, [0, 0], [info.outFeatures, r]) as tf.Tensor2D };
  }

  private linear(module: LinearModule, x: tf.Tensor2D, base: (x: tf.Tensor2D) => tf.Tensor2D, ctx: HookContext): tf.Tensor2D {
    const mod = this.modules.get(module.path);
    if (!mod || this.mergedWeights.active) return base(x);
    const { a, b } = this.sliced(mod.info);
    const xd = dropout(x, this.config.veraDropout, ctx.training, this.ctx.rng);
    const inner = tf.mul(linear(xd, a), mod.lambdaD);
    return tf.add(base(x), tf.mul(linear(inner, b), mod.lambdaB)) as tf.Tensor2D;
  }

  get merged(): boolean {
    return this.mergedWeights.active;
  }

  merge(): void {
    if (this.merged) return;
    for (const mod of this.modules.values()) {
      // delta = diag(lambda_b) B diag(lambda_d) A, PEFT's get_delta_weight.
      this.mergedWeights.replace(mod.info.weightName, (w) => {
        const { a, b } = this.sliced(mod.info);
        return tf.add(w, tf.matMul(tf.mul(b, tf.reshape(mod.lambdaB, [-1, 1])), tf.mul(a, tf.reshape(mod.lambdaD, [-1, 1]))));
      });
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
