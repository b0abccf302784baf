// The errors the command line itself raises; errors from the folders below keep their own codes.

export const CLI_ERRORS = {
  TANDEM_CLI_FLAG_INVALID: 'a flag has a value the command cannot use',
  TANDEM_CLI_FLAG_MISSING: 'a required flag is missing',
} as const;

export type CliErrorCode = keyof typeof CLI_ERRORS;

export class CliError extends Error {
  override readonly name = 'CliError';
  readonly code: CliErrorCode;
  readonly flag: string;

  constructor(code: CliErrorCode, flag: string, message: string) {
    super(`${code}: ${flag}: ${message}`);
    this.code = code;
    this.flag = flag;
  }
}
