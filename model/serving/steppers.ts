// The engines a serving loop steps on, behind one interface: tfjs (batchedLastLogits over
// per-sequence tfjs caches, the adapter's hooks per row group) and ONNX Runtime
// (OrtServingEngine: the base once per batch in one graph, each adapter's unmerged LoRA
// stacked and selected per row). Either gives, per row, the logits at its last new token.
import type { Adapter } from '../peft/adapter.ts';
import { ModelError } from '../errors.ts';
import { KvCache } from '../llama/llama.ts';
import type { LlamaModel } from '../llama/llama.ts';
import type { ModelConfig } from '../config.ts';
import { ServingLora } from '../engine/serving-engine.ts';
import { loraParamsOf, ortLoraPlan } from '../train/ort-plan.ts';
import { batchedLastLogits, checkServableHooks } from './batched-forward.ts';

/** One sequence's state on a stepper. */
export interface StepperSequence {
  free(): void;
}

export interface ServingStepper {
  /** 'tfjs' or the ONNX Runtime engine's name. */
  readonly engine: string;
  /** A sequence with room for `capacity` positions under this adapter (none: the base); throws a typed error for an adapter this engine cannot serve. */
  open(adapter: Adapter | undefined, capacity: number): StepperSequence;
  /** Runs each row's new tokens; each row's logits at its last new token. Rows of one adapter side by side run fastest on tfjs. */
  step(rows: readonly { ids: readonly number[]; sequence: StepperSequence }[]): Promise<Float32Array[]>;
  dispose(): Promise<void>;
}

class TfjsSequence implements StepperSequence {
  readonly cache = new KvCache();
  constructor(readonly adapter: Adapter | undefined) {}
  free(): void {
    this.cache.dispose();
  }
}

/** Steps on tfjs: the model's variables, each adapter through its hooks. */
export function tfjsStepper(model: LlamaModel): ServingStepper {
  return {
    engine: 'tfjs',
    open(adapter) {
      if (adapter !== undefined) checkServableHooks(adapter.hooks);
      return new TfjsSequence(adapter);
    },
    step(rows) {
      return Promise.resolve(batchedLastLogits(model, rows.map((r) => {
        const s = r.sequence as TfjsSequence;
        return { ids: r.ids, cache: s.cache, hooks: s.adapter?.hooks };
      })));
    },
    dispose: () => Promise.resolve(),
  };
}

/** OrtServingEngine, or ServingThread (the same engine in a worker thread). */
export interface OrtServing<S> {
  readonly config: ModelConfig;
  sequence(capacity: number, lora?: ServingLora): S;
  step(rows: readonly { ids: readonly number[]; sequence: S }[]): Promise<Float32Array[]>;
  free?(sequence: S): void;
  dispose(): Promise<void>;
}

class OrtSequence<S> implements StepperSequence {
  constructor(
    readonly sequence: S,
    private readonly release: () => void,
  ) {}
  free(): void {
    this.release();
  }
}

/** Steps on ONNX Runtime; an adapter must be plain LoRA (ortLoraPlan), its factors read once per adapter. */
export function ortStepper<S>(engine: OrtServing<S>, name: string): ServingStepper {
  const loras = new WeakMap<Adapter, ServingLora>();
  return {
    engine: name,
    open(adapter, capacity) {
      let lora: ServingLora | undefined;
      if (adapter !== undefined) {
        lora = loras.get(adapter);
        if (lora === undefined) {
          const planned = ortLoraPlan(adapter, engine.config);
          if (planned.plan === undefined) throw new ModelError('TANDEM_INPUT_INVALID', `this adapter cannot be served on ${name}: ${planned.reason}`, { field: 'model' });
          lora = new ServingLora(engine.config, planned.plan.spec, loraParamsOf(planned.plan));
          loras.set(adapter, lora);
        }
      }
      const sequence = engine.sequence(capacity, lora);
      return new OrtSequence(sequence, () => engine.free?.(sequence));
    },
    step(rows) {
      return engine.step(rows.map((r) => ({ ids: r.ids, sequence: (r.sequence as OrtSequence<S>).sequence })));
    },
    dispose: () => engine.dispose(),
  };
}
