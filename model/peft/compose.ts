// createAdapter: instantiates the methods of a spec list on a model and composes them into
// one Adapter.
import { ModelError } from '../errors.ts';
import type { ForwardHooks } from '../hooks.ts';
import type { LlamaModel } from '../llama/llama.ts';
import { Rng } from '../random.ts';
import type { tf } from '../backend.ts';
import type { Adapter } from './adapter.ts';
import type { AdapterTensor, MethodInstance, PeftMethod } from './method.ts';
import { defaultRegistry } from './methods.ts';
import type { AdapterPlan } from './plan.ts';
import { planAdapterConfigs } from './plan.ts';
import type { MethodRegistry } from './registry.ts';

/** One method of an adapter: its registry name and its fields in camelCase (see each method's config). */
export interface MethodSpec {
  method: string;
  [field: string]: unknown;
}

export interface CreateAdapterOptions {
  /** Seeds initialization and dropout; the same seed gives the same adapter and the same masks. */
  seed?: number;
  /**
   * The methods given are those from this index on of an adapter created with `seed`: each
   * gets the generator it would get there. The cloud creates the middle part of an adapter
   * whose first methods the edge holds, initialised as one createAdapter of them all would.
   */
  methodOffset?: number;
  registry?: MethodRegistry;
  /**
   * Refuse (TANDEM_ADAPTER_TOO_LARGE) an adapter whose tensors would take more bytes; the
   * default is the bytes of the model's weights, at least 256 MiB (see plan.ts).
   */
  maxAllocationBytes?: number;
}

/** One instantiated method of a PeftAdapter, with its validated configuration. */
export interface AdapterMethod {
  method: PeftMethod;
  config: unknown;
  instance: MethodInstance;
  readonly rng: Rng;
}

/** The Adapter the PEFT methods build, with what saving needs. */
export interface PeftAdapter extends Adapter {
  readonly methods: readonly AdapterMethod[];
  /** Every tensor to save (trainable or not), by on-disk key. */
  state(): Map<string, AdapterTensor>;
  /** The generators' states (dropout masks), for training checkpoints. */
  randomState(): number[][];
  setRandomState(state: readonly (readonly number[])[]): void;
}

function overlaps(a: string, b: string): boolean {
  return a === b || a.startsWith(`${b}.`) || b.startsWith(`${a}.`);
}

/** Each spec's method and its configuration, validated by the method. */
function configsOf(specs: readonly MethodSpec[], registry: MethodRegistry): { method: PeftMethod; config: unknown }[] {
  return specs.map((spec, i) => {
    if (typeof spec?.method !== 'string') throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `spec ${i} needs a method name; known methods are ${registry.names().join(', ')}`, { field: `specs[${i}].method` });
    const method = registry.get(spec.method);
    return { method, config: method.fromSpec(spec) };
  });
}

/**
 * The positions an adapter of these specs prepends to every sequence (prompt tuning's virtual
 * tokens), known before any model is: what a run's sequence length must leave room for.
 */
export function specVirtualTokens(specs: readonly MethodSpec[], registry: MethodRegistry = defaultRegistry()): number {
  return configsOf(specs, registry).reduce((n, { method, config }) => n + (method.virtualTokens?.(config) ?? 0), 0);
}

export function createAdapter(model: LlamaModel, specs: readonly MethodSpec[], options: CreateAdapterOptions = {}): PeftAdapter {
  const registry = options.registry ?? defaultRegistry();
  const configs = configsOf(specs, registry);
  const methodOffset = options.methodOffset ?? 0;
  if (!Number.isInteger(methodOffset) || methodOffset < 0 || methodOffset > 1024) throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `methodOffset must be an integer from 0 to 1024, got ${methodOffset}`, { field: 'methodOffset' });
  return instantiate(model, configs, { seed: options.seed ?? 0, fromFile: false, methodOffset, maxAllocationBytes: options.maxAllocationBytes });
}

/**
 * Builds the adapter from validated configurations (createAdapter and loadAdapter share it).
 * Nothing is allocated before the adapter is planned: its sizes checked against the model and
 * its bytes against the limit (`plan` when the caller has planned it already).
 */
export function instantiate(
  model: LlamaModel,
  configs: readonly { method: PeftMethod; config: unknown }[],
  options: { seed: number; fromFile: boolean; methodOffset?: number; maxAllocationBytes?: number; plan?: AdapterPlan },
): PeftAdapter {
  if (configs.length === 0) throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', 'an adapter needs at least one method', { field: 'specs' });
  if (options.plan === undefined) planAdapterConfigs(model, configs, { maxAllocationBytes: options.maxAllocationBytes });
  const seeds = new Rng(options.seed);
  for (let i = 0; i < (options.methodOffset ?? 0); i++) seeds.nextU32();
  const methods: AdapterMethod[] = [];
  try {
    for (const { method, config } of configs) {
      const rng = new Rng(seeds.nextU32());
      methods.push({ method, config, rng, instance: method.create(model, config, { rng, fromFile: options.fromFile }) });
    }
    checkDisjoint(methods);
  } catch (err) {
    for (const m of methods) m.instance.dispose();
    throw err;
  }
  return new ComposedAdapter(methods);
}

function checkDisjoint(methods: readonly AdapterMethod[]): void {
  const claimed: { claim: string; by: string }[] = [];
  const keys = new Map<string, string>();
  for (const { method, instance } of methods) {
    for (const claim of instance.claims) {
      const other = claimed.find((c) => overlaps(c.claim, claim));
      if (other) {
        throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `${method.name} and ${other.by} both change ${claim.length < other.claim.length ? claim : other.claim}; give them disjoint layers or modules`, { field: 'specs' });
      }
    }
    for (const claim of instance.claims) claimed.push({ claim, by: method.name });
    for (const s of instance.state) {
      const other = keys.get(s.key);
      if (other) throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `${method.name} and ${other} both save ${s.key}; one method of each kind per module`, { field: 'specs', tensor: s.key });
      keys.set(s.key, method.name);
    }
  }
}

class ComposedAdapter implements PeftAdapter {
  readonly hooks: ForwardHooks;
  readonly numVirtualTokens: number;
  private isMerged = false;
  private disposed = false;

  constructor(readonly methods: readonly AdapterMethod[]) {
    this.numVirtualTokens = methods.reduce((n, m) => n + m.instance.numVirtualTokens, 0);
    this.hooks = composeHooks(methods.map((m) => m.instance.hooks));
  }

  get merged(): boolean {
    return this.isMerged;
  }

  trainableVariables(): Map<string, tf.Variable> {
    const out = new Map<string, tf.Variable>();
    for (const [key, s] of this.state()) if (s.trainable) out.set(key, s.variable);
    return out;
  }

  projectGradients(grads: Map<string, tf.Tensor>): void {
    for (const m of this.methods) m.instance.projectGradients?.(grads);
  }

  state(): Map<string, AdapterTensor> {
    const out = new Map<string, AdapterTensor>();
    for (const m of this.methods) for (const s of m.instance.state) out.set(s.key, s);
    return out;
  }

  merge(): void {
    if (this.isMerged) return;
    const blocked = this.methods.filter((m) => m.instance.mergeBlocker !== undefined);
    if (blocked.length > 0) {
      throw new ModelError('TANDEM_MERGE_UNSUPPORTED', blocked.map((m) => `${m.method.name}: ${m.instance.mergeBlocker}`).join('; '), { field: 'merge' });
    }
    // Inner methods first: a later method wraps the output of the earlier ones.
    for (const m of this.methods) m.instance.merge();
    this.isMerged = true;
  }

  unmerge(): void {
    if (!this.isMerged) return;
    for (const m of [...this.methods].reverse()) m.instance.unmerge();
    this.isMerged = false;
  }

  randomState(): number[][] {
    return this.methods.map((m) => m.rng.state());
  }

  setRandomState(state: readonly (readonly number[])[]): void {
    if (state.length !== this.methods.length) throw new ModelError('TANDEM_INPUT_INVALID', `random state has ${state.length} entries, the adapter has ${this.methods.length} methods`, { field: 'randomState' });
    this.methods.forEach((m, i) => m.rng.restore(state[i]));
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const m of [...this.methods].reverse()) m.instance.dispose();
  }
}

/** Chains each hook kind: a later method calls the earlier ones as its `base`/input. */
function composeHooks(all: readonly ForwardHooks[]): ForwardHooks {
  const linears = all.flatMap((h) => (h.linear ? [h.linear.bind(h)] : []));
  const sublayers = all.flatMap((h) => (h.sublayer ? [h.sublayer.bind(h)] : []));
  const embeddings = all.flatMap((h) => (h.embeddings ? [h.embeddings.bind(h)] : []));
  const hooks: ForwardHooks = {};
  if (linears.length > 0) {
    hooks.linear = (module, x, base, ctx) => {
      let f = base;
      for (const hook of linears) {
        const inner = f;
        f = (input) => hook(module, input, inner, ctx);
      }
      return f(x);
    };
  }
  if (sublayers.length > 0) hooks.sublayer = (layer, kind, input, output, ctx) => sublayers.reduce((out, hook) => hook(layer, kind, input, out, ctx), output);
  if (embeddings.length > 0) hooks.embeddings = (h, ctx) => embeddings.reduce((x, hook) => hook(x, ctx), h);
  return hooks;
}
