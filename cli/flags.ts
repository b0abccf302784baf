import { readFile, stat } from 'node:fs/promises';
import { ENGINES, parseEngineName } from '../model/index.ts';
import { CliError } from './errors.ts';

/** The help line of --engine, shared by train, eval and generate. */
export const ENGINE_FLAG_HELP = `engine of the frozen work: auto (best first: ${ENGINES.join(', ')}) or one of them; default auto, or TANDEM_ENGINE; with only --backend, tfjs on that backend`;

/**
 * The engine a command asks for, checked before any work: --engine, else TANDEM_ENGINE (left to
 * the run), else 'auto' unless --backend alone asks for tfjs.
 */
export function engineFlag(flags: { engine?: string; backend?: string }): string | undefined {
  if (flags.engine !== undefined) {
    parseEngineName(flags.engine, '--engine');
    return flags.engine;
  }
  if (process.env.TANDEM_ENGINE) return undefined;
  return flags.backend === undefined ? 'auto' : undefined;
}

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

/** Largest PEM file read for --tls-cert / --tls-key (a long chain fits many times over). */
const MAX_PEM_BYTES = 1024 * 1024;

/** Reads a PEM flag's file, bounded, before anything starts. */
export async function pemFlag(flag: string, path: string): Promise<Buffer> {
  const s = await stat(path).catch(() => undefined);
  if (s === undefined || !s.isFile()) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `${JSON.stringify(path)} is not a readable file`);
  if (s.size > MAX_PEM_BYTES) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `${JSON.stringify(path)} holds ${s.size} bytes; a PEM file is at most ${MAX_PEM_BYTES}`);
  const bytes = await readFile(path);
  if (!bytes.toString('latin1').includes('-----BEGIN ')) throw new CliError('TANDEM_CLI_FLAG_INVALID', flag, `${JSON.stringify(path)} is not PEM (no -----BEGIN line)`);
  return bytes;
}
