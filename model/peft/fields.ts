// Declarative config fields: one table per method gives each field's camelCase API name,
// its PEFT on-disk name, its default and its validation; specs, files and writing all
// derive from the table.
import { ModelError } from '../errors.ts';

export interface FieldAt {
  /** The name as the user wrote it: camelCase in a spec, PEFT's snake_case in a file. */
  field: string;
  file?: string;
}

export interface Field<T> {
  /** PEFT's name in adapter_config.json. */
  json: string;
  /** Validates a value (undefined when absent) and applies the default. */
  read(value: unknown, at: FieldAt): T;
  /** The value as written to adapter_config.json; identity when absent. */
  write?(value: T): unknown;
  /**
   * False for a field read but never written: one that PEFT's oldest supported version does
   * not know (its __init__ would refuse the file), always at PEFT's default when Tandem writes.
   */
  written?: boolean;
}

export type Schema = Record<string, Field<unknown>>;
export type ConfigOf<S extends Schema> = { [K in keyof S]: S[K] extends Field<infer T> ? T : never };

export function configError(at: FieldAt, message: string): ModelError {
  return new ModelError('TANDEM_PEFT_CONFIG_INVALID', `${at.field} ${message}`, { field: at.field, file: at.file });
}

const show = (v: unknown): string => JSON.stringify(v) ?? String(v);

/** The name a field goes by where it was read: PEFT's snake_case in a file, camelCase in a spec. */
export function fieldAt(file: string | undefined, snake: string, camel: string): FieldAt {
  return file === undefined ? { field: camel } : { field: snake, file };
}

/**
 * A size a configuration states over what the model allows (a rank above the widest layer it
 * targets, more virtual tokens than the context): names the field, the value and the limit.
 */
export function checkAtMost(at: FieldAt, actual: number, limit: number, why: string): void {
  if (actual <= limit) return;
  throw new ModelError('TANDEM_PEFT_CONFIG_INVALID', `${at.field} is ${actual}, over the limit of ${limit} (${why})`, { field: at.field, file: at.file, details: { actual, limit } });
}

/** Reads a camelCase spec; a key the method does not know is an error naming the keys it does. */
export function readSpec<S extends Schema>(schema: S, spec: Readonly<Record<string, unknown>>, method: string): ConfigOf<S> {
  for (const key of Object.keys(spec)) {
    if (key !== 'method' && !Object.hasOwn(schema, key)) {
      throw configError({ field: key }, `is not a field of ${method}; its fields are ${Object.keys(schema).join(', ')}`);
    }
  }
  const out: Record<string, unknown> = {};
  for (const [key, f] of Object.entries(schema)) out[key] = f.read(spec[key], { field: key });
  return out as ConfigOf<S>;
}

/** Fields of every adapter_config.json that describe the file, not the computation (PeftConfigMixin's, and Tandem's composite entry name). */
export const DESCRIPTIVE_FIELDS: readonly string[] = ['peft_type', 'task_type', 'base_model_name_or_path', 'revision', 'inference_mode', 'auto_mapping', 'peft_version', 'tandem_method'];

/** A value that turns a PEFT option off: absent, null, false, an empty list or object. */
function isOff(v: unknown): boolean {
  return v === undefined || v === null || v === false || (Array.isArray(v) && v.length === 0) || (typeof v === 'object' && v !== null && Object.keys(v).length === 0);
}

/**
 * Reads the method's fields from adapter_config.json by PEFT's names. A field outside the
 * schema is ignored only when it cannot change the computation: a descriptive field, one the
 * method lists as `inert` (initialization-only or runtime settings), or one at its "off" value
 * (null, false, empty), as PEFT writes every option it does not use. Any other value names an
 * option Tandem does not implement (alora_invocation_tokens, use_qalora, ...) and is refused.
 */
export function readJson<S extends Schema>(schema: S, json: Readonly<Record<string, unknown>>, file: string, inert: readonly string[] = []): ConfigOf<S> {
  const known = new Set([...Object.values(schema).map((f) => f.json), ...DESCRIPTIVE_FIELDS, ...inert]);
  for (const [key, v] of Object.entries(json)) {
    if (!known.has(key) && !isOff(v)) {
      throw configError({ field: key, file }, `is ${show(v)}: an option Tandem does not implement, and it changes the computation; remove it or set it to null`);
    }
  }
  const out: Record<string, unknown> = {};
  for (const [key, f] of Object.entries(schema)) out[key] = f.read(json[f.json], { field: f.json, file });
  return out as ConfigOf<S>;
}

export function writeJson<S extends Schema>(schema: S, config: ConfigOf<S>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, f] of Object.entries(schema)) {
    if (f.written === false) continue;
    const v = (config as Record<string, unknown>)[key];
    out[f.json] = f.write ? f.write(v) : v;
  }
  return out;
}

export function int(json: string, options: { min: number; default?: number }): Field<number> {
  return {
    json,
    read(v, at) {
      if (v === undefined && options.default !== undefined) return options.default;
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < options.min) throw configError(at, `must be an integer >= ${options.min} (and at most 2^53 - 1), got ${show(v)}`);
      return v;
    },
  };
}

export function num(json: string, options: { min: number; max?: number; minExclusive?: boolean; maxExclusive?: boolean; default: number }): Field<number> {
  const range = `${options.minExclusive ? '(' : '['}${options.min}, ${options.max ?? 'inf'}${options.maxExclusive || options.max === undefined ? ')' : ']'}`;
  return {
    json,
    read(v, at) {
      if (v === undefined) return options.default;
      const ok =
        typeof v === 'number' &&
        Number.isFinite(v) &&
        (options.minExclusive ? v > options.min : v >= options.min) &&
        (options.max === undefined || (options.maxExclusive ? v < options.max : v <= options.max));
      if (!ok) throw configError(at, `must be a number in ${range}, got ${show(v)}`);
      return v as number;
    },
  };
}

export function bool(json: string, fallback: boolean): Field<boolean> {
  return {
    json,
    read(v, at) {
      if (v === undefined || v === null) return fallback;
      if (typeof v !== 'boolean') throw configError(at, `must be true or false, got ${show(v)}`);
      return v;
    },
  };
}

export function oneOf<const T extends string | number | boolean>(json: string, values: readonly T[], fallback: T): Field<T> {
  return {
    json,
    read(v, at) {
      if (v === undefined || v === null) return fallback;
      if (!values.includes(v as T)) throw configError(at, `must be one of ${values.map(show).join(', ')}, got ${show(v)}`);
      return v as T;
    },
  };
}

export function optionalString(json: string): Field<string | null> {
  return {
    json,
    read(v, at) {
      if (v === undefined || v === null) return null;
      if (typeof v !== 'string') throw configError(at, `must be a string or null, got ${show(v)}`);
      return v;
    },
  };
}

/**
 * A PEFT field Tandem supports only at its neutral value (e.g. fan_in_fan_out false). Any other
 * value changes the math, so it is refused with `hint` saying what to do.
 */
export function neutral<T>(json: string, value: T, hint: string): Field<T> {
  const isNeutral = (v: unknown): boolean =>
    v === undefined ||
    v === null ||
    v === value ||
    (Array.isArray(v) && v.length === 0) ||
    (typeof v === 'object' && v !== null && !Array.isArray(v) && Object.keys(v).length === 0 && typeof value === 'object');
  return {
    json,
    read(v, at) {
      if (!isNeutral(v)) throw configError(at, `${show(v)} is not supported: ${hint}`);
      return value;
    },
  };
}

/** A field as read, but never written to adapter_config.json (see Field.written). */
export function unwritten<T>(field: Field<T>): Field<T> {
  return { ...field, written: false };
}

/** The longest regex target_modules may be, and how many quantifiers it may hold. */
export const TARGET_REGEX_LIMITS = { chars: 256, quantifiers: 4 } as const;

/**
 * A target_modules regex runs on JavaScript's backtracking engine against every module path,
 * so one from a file or the network could take exponential time ("(.*.*)*X"). PEFT's own
 * regexes are of the kind "model.layers.(0|1).self_attn.(q_proj|v_proj)": this admits them and
 * refuses a group repeated by *, + or {n,m} and more than a few quantifiers, which bounds the
 * backtracking (an optional group, as in the regex IA3's layers fold into, stays).
 */
function checkTargetRegex(v: string, at: FieldAt): void {
  if (v.length > TARGET_REGEX_LIMITS.chars) throw configError(at, `is a regex of ${v.length} characters, over the limit of ${TARGET_REGEX_LIMITS.chars}`);
  try {
    new RegExp(v);
  } catch (cause) {
    throw configError(at, `is not a valid regular expression: ${(cause as Error).message}`);
  }
  let quantifiers = 0;
  for (let i = 0; i < v.length; i++) {
    const c = v[i];
    if (c === '\\') {
      i++;
    } else if (c === '[') {
      for (i++; i < v.length && v[i] !== ']'; i++) if (v[i] === '\\') i++;
    } else if (c === '*' || c === '+' || c === '{' || (c === '?' && v[i - 1] !== '(')) {
      if (v[i - 1] === ')' && c !== '?') throw configError(at, `quantifies a group at character ${i} (${show(v)}): list the alternatives instead, e.g. "(q_proj|v_proj)" without a repeat, or give a list of names`);
      quantifiers++;
      if (quantifiers > TARGET_REGEX_LIMITS.quantifiers) throw configError(at, `holds more than ${TARGET_REGEX_LIMITS.quantifiers} quantifiers (${show(v)}); give a list of module names instead`);
    }
  }
}

/** PEFT's target_modules: a list of module-name suffixes, a regex matched against the full module path, or "all-linear". */
export type TargetModules = readonly string[] | string;

export function targetModules(json: string, fallback: readonly string[]): Field<TargetModules> {
  return {
    json,
    read(v, at) {
      if (v === undefined || v === null) return fallback;
      if (typeof v === 'string') {
        if (v === '') throw configError(at, 'must not be empty: give module names such as ["q_proj", "v_proj"], a regex, or "all-linear"');
        if (v !== 'all-linear') checkTargetRegex(v, at);
        return v;
      }
      if (!Array.isArray(v) || v.length === 0 || v.some((s) => typeof s !== 'string' || s === '')) {
        throw configError(at, `must be a non-empty list of module names (e.g. ["q_proj", "v_proj"]), a regex string or "all-linear", got ${show(v)}`);
      }
      return [...v] as string[];
    },
  };
}

/** PEFT's layers_to_transform: one layer index or a list of them; null means every layer. */
export function layerList(json: string, options: { required?: string } = {}): Field<number[] | null> {
  return {
    json,
    read(v, at) {
      if (v === undefined || v === null) {
        if (options.required) throw configError(at, `is required: ${options.required}`);
        return null;
      }
      const list = typeof v === 'number' ? [v] : v;
      if (!Array.isArray(list) || list.length === 0 || list.some((i) => typeof i !== 'number' || !Number.isInteger(i) || i < 0)) {
        throw configError(at, `must be a layer index or a non-empty list of layer indices (integers >= 0), got ${show(v)}`);
      }
      if (new Set(list).size !== list.length) throw configError(at, `lists a layer twice: ${show(v)}`);
      return [...(list as number[])];
    },
  };
}
