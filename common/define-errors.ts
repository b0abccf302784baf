// The one way a folder defines its typed errors: a catalogue of stable codes, each with a
// message template (and, where the code travels, its HTTP status or wire number), and one
// class per folder built on TandemError. This folder imports nothing, so every folder may
// import it (protocol/ and model/ included, which may not import each other).

/** One code of a catalogue. */
export interface ErrorEntry {
  /** The message; `{name}` is filled from the error's details. Default '{reason}'. */
  readonly template?: string;
  /** What the code means, for readers of the catalogue. */
  readonly summary?: string;
  /** The HTTP status an operator API answers with. */
  readonly status?: number;
  /** The code's number on the wire, for peers that match on numbers. */
  readonly number?: number;
}

export type ErrorCatalogue = Readonly<Record<string, ErrorEntry>>;

export type ErrorDetails = Readonly<Record<string, unknown>>;

export interface TandemErrorOptions {
  details?: ErrorDetails;
  cause?: unknown;
}

// A registered symbol, so the check holds across two copies of this module.
const BRAND = Symbol.for('tandem.error');

/**
 * The base of every typed error in Tandem: `code` is stable, `message` says what happened
 * without the code (describe() puts the two together), `details` holds the values the message
 * names, and `cause` is kept.
 */
export class TandemError<C extends string = string> extends Error {
  readonly code: C;
  readonly details: ErrorDetails;
  /** The entry's HTTP status, if the catalogue gives one. */
  readonly status?: number;
  /** The entry's wire number, if the catalogue gives one. */
  readonly number?: number;

  constructor(name: string, code: C, entry: ErrorEntry, message: string, options: TandemErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    Object.defineProperty(this, 'name', { value: name, enumerable: false, configurable: true, writable: true });
    Object.defineProperty(this, BRAND, { value: true, enumerable: false });
    this.code = code;
    this.details = options.details ?? {};
    if (entry.status !== undefined) this.status = entry.status;
    if (entry.number !== undefined) this.number = entry.number;
    // V8 wrote the stack's first line before the name and the code were known.
    if (typeof this.stack === 'string') {
      const nl = this.stack.indexOf('\n');
      this.stack = `${name}: ${this.describe()}${nl < 0 ? '' : this.stack.slice(nl)}`;
    }
  }

  /** The code and the message in one line, as the CLI prints it: `CODE: message` (`CODE (number): message` with a number). */
  describe(): string {
    return `${this.code}${this.number === undefined ? '' : ` (${this.number})`}: ${this.message}`;
  }

  override toString(): string {
    return `${this.name}: ${this.describe()}`;
  }
}

/** Whether `e` is a Tandem typed error from any folder (a real check, not duck typing on `code`). */
export function isTandemError(e: unknown): e is TandemError {
  return typeof e === 'object' && e !== null && (e as Record<symbol, unknown>)[BRAND] === true;
}

/** Fills `{name}` placeholders from details; unknown placeholders stay as written. */
export function fillTemplate(template: string, details: ErrorDetails): string {
  return template.replace(/\{(\w+)\}/g, (whole, key: string) => (Object.hasOwn(details, key) ? String(details[key]) : whole));
}

export interface DefinedErrors<K extends string> {
  readonly catalogue: Readonly<Record<K, ErrorEntry>>;
  /** Whether a string is one of this catalogue's codes (for codes read from the wire). */
  isCode(code: string): code is K;
  /** The entry's template filled from details. */
  format(code: K, details: ErrorDetails): string;
  /** The folder's error class extends this; its constructor takes the code, the message and the options. */
  readonly Base: new (code: K, message: string, options?: TandemErrorOptions) => TandemError<K>;
}

/**
 * Defines a folder's errors from its catalogue:
 *
 *     const defined = defineErrors('ModelError', { TANDEM_X: { template: '{field} must be ...' } });
 *     export class ModelError extends defined.Base { ... }
 */
export function defineErrors<const K extends string>(name: string, catalogue: Readonly<Record<K, ErrorEntry>>): DefinedErrors<K> {
  const entryOf = (code: K): ErrorEntry => catalogue[code] ?? {};
  class Base extends TandemError<K> {
    constructor(code: K, message: string, options: TandemErrorOptions = {}) {
      super(name, code, entryOf(code), message, options);
    }
  }
  return {
    catalogue,
    isCode: (code: string): code is K => Object.hasOwn(catalogue, code),
    format: (code, details) => fillTemplate(entryOf(code).template ?? '{reason}', details),
    Base,
  };
}
