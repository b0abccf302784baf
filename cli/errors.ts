// The errors the command line itself raises; errors from the folders below keep their own codes.
import { defineErrors } from '../common/define-errors.ts';

export const CLI_ERRORS = {
  TANDEM_CLI_FLAG_INVALID: { summary: 'a flag has a value the command cannot use' },
  TANDEM_CLI_FLAG_MISSING: { summary: 'a required flag is missing' },
} as const satisfies Record<string, { summary: string }>;

export type CliErrorCode = keyof typeof CLI_ERRORS;

const defined = defineErrors('CliError', CLI_ERRORS);

export class CliError extends defined.Base {
  readonly flag: string;

  constructor(code: CliErrorCode, flag: string, message: string) {
    super(code, `${flag}: ${message}`);
    this.flag = flag;
  }
}
