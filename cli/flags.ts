import { CliError } from './errors.ts';

/** Parses a number flag, checking that it is finite and within [min, max]; integers when asked. */
export function numberFlag(flag: string, value: string | undefined, options: { min?: number; max?: number; integer?: boolean; fallback?: number } = {}): number {
  if (value === undefined) {
    if (options.fallback !== undefined) return options.fallback;
    throw new CliError('TANDEM_CLI_FLAG_MISSING', flag, 'is required');
  }
  const n = Number(value);
  const kind = options.integer ? 'an integer' : 'a number';
  if (value.trim() === '' || !Number.isFinite(n) || (options.integer && !Number.isInteger(n))) {
    throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `must be ${kind}, got ${JSON.stringify(value)}`);
  }
  if (options.min !== undefined && n < options.min) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `must be at least ${options.min}, got ${n}`);
  if (options.max !== undefined && n > options.max) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `must be at most ${options.max}, got ${n}`);
  return n;
}

/** A required string flag. */
export function requiredFlag(flag: string, value: string | undefined): string {
  if (value === undefined || value === '') throw new CliError('TANDEM_CLI_FLAG_MISSING', flag, 'is required');
  return value;
}
