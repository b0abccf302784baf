// The utility cost of a defense measured the way a user pays it: the edge trains its adapters
// (LoRA on its bottom and top blocks) through a middle that applies the defenses, h_B noised in
// training as in split mode, and the trained model is validated as a user would run it (split
// mode, the defenses still on). Comparing that validation loss with an undefended run of the
// same length gives the cost; what the trained bottom sends is what the attacks then face.
import { tf } from '../backend.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { createAdapter } from '../peft/index.ts';
import type { PeftAdapter } from '../peft/index.ts';
import type { Rng } from '../random.ts';
import type { Batch } from '../train/batch.ts';
import { Trainer } from '../train/loop.ts';
import { LocalMiddle } from '../train/middle.ts';
import { AdamW } from '../train/optimizer.ts';
import { DefendedMiddle } from './defended-middle.ts';
import { checkDefenses, noiseHiddenInPlace } from './defenses.ts';
import type { Defenses } from './defenses.ts';
import { PrivacyError } from './errors.ts';

export interface TrainedRunOptions {
  model: LlamaModel;
  /** The asked cut; a deeper bottom moves it. */
  cut: { bottom: number; top: number };
  defenses: Defenses;
  train: readonly Batch[];
  validation: readonly Batch[];
  /** More validation sets, scored the same way after the same training (e.g. unseen events of label data). */
  extraValidation?: Readonly<Record<string, readonly Batch[]>>;
  steps: number;
  lr?: number;
  rank?: number;
  seed?: number;
}

export interface TrainedRun {
  /** Mean validation loss per label token, the defenses on. */
  validationLoss: number;
  /** The same loss on each of `extraValidation`'s sets. */
  extraValidationLoss: Record<string, number>;
  /** The bottom the run trained (the cut after a deeper bottom). */
  bottom: number;
  /** The defenses in force (the noise clip fixed from the first h_B). */
  applied: Defenses;
  /** What this edge would send for rows: its trained bottom's h_B with the noise defense, flat [rows, seq, hidden]. */
  sent(rows: readonly (readonly number[])[], rng: Rng): Float32Array;
  dispose(): void;
}

export const TRAINED_RUN_LIMITS = { steps: 10_000 } as const;

/** Trains the edge's adapters under the defenses and validates the result with them on. */
export async function trainUnderDefenses(options: TrainedRunOptions): Promise<TrainedRun> {
  const { model, train, validation } = options;
  const defenses = checkDefenses(options.defenses);
  if (!Number.isInteger(options.steps) || options.steps < 0 || options.steps > TRAINED_RUN_LIMITS.steps) {
    throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `steps must be an integer in [0, ${TRAINED_RUN_LIMITS.steps}], got ${options.steps}`, { field: 'steps' });
  }
  const extra = Object.entries(options.extraValidation ?? {});
  if (extra.some(([, batches]) => batches.length === 0)) throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', 'an extra validation set holds no batch', { field: 'extraValidation' });
  if (train.length === 0 || validation.length === 0) throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', 'training needs training and validation batches', { field: 'data' });
  const L = model.numLayers;
  const bottom = options.cut.bottom + (defenses.deeperBottom ?? 0);
  const top = options.cut.top;
  if (bottom + top >= L) throw new PrivacyError('TANDEM_AUDIT_INPUT_INVALID', `cut (${bottom}, ${top}) leaves no middle in ${L} blocks`, { field: 'cut' });
  const layers = [...Array.from({ length: bottom }, (_, i) => i), ...Array.from({ length: top }, (_, i) => L - top + i)];
  const adapter: PeftAdapter = createAdapter(model, [{ method: 'lora', r: options.rank ?? 8, loraAlpha: 2 * (options.rank ?? 8), targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], layersToTransform: layers }], { seed: options.seed ?? 0 });
  const middle = new DefendedMiddle(new LocalMiddle(model, bottom, L - top), defenses, (options.seed ?? 0) + 17);
  const trainer = new Trainer({
    model,
    adapter,
    optimizer: new AdamW(),
    schedule: { kind: 'constant', lr: options.lr ?? 3e-3, warmupSteps: 0, totalSteps: Math.max(options.steps, 1) },
    cut: { bottom, top },
    middle,
    ...(defenses.nopeek ? { noPeek: defenses.nopeek.weight } : {}),
  });
  try {
    for (let s = 0; s < options.steps; s++) await trainer.trainStep([train[s % train.length]]);
    // Every validation batch, over all the sets, its own micro-batch key: a middle may answer a repeated key from what it kept.
    let index = 0;
    const score = async (batches: readonly Batch[]): Promise<number> => {
      let nll = 0;
      let tokens = 0;
      for (const batch of batches) {
        const result = await trainer.score(batch, index++);
        nll += result.lossSum;
        tokens += result.tokens;
      }
      return nll / Math.max(tokens, 1);
    };
    const validationLoss = await score(validation);
    const extraValidationLoss: Record<string, number> = {};
    for (const [name, batches] of extra) extraValidationLoss[name] = await score(batches);
    const applied = structuredClone(middle.applied);
    return {
      validationLoss,
      extraValidationLoss,
      bottom,
      applied,
      sent(rows, rng) {
        const seq = rows[0]?.length ?? 0;
        const h = tf.tidy(() => {
          const ids = tf.tensor2d(rows.flat(), [rows.length, seq], 'int32');
          const o = { hooks: adapter.hooks, positionOffset: 0 };
          const h0 = model.embed(ids, o);
          return Float32Array.from((bottom > 0 ? model.blocks(h0, 0, bottom, o) : h0).dataSync());
        });
        if (applied.noise) noiseHiddenInPlace(h, model.config.hiddenSize, applied.noise, rng);
        return h;
      },
      dispose() {
        adapter.dispose();
      },
    };
  } finally {
    trainer.dispose();
    middle.dispose();
  }
}
