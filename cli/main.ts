import { Command, CommanderError } from 'commander';
import { auditCommand } from './audit.ts';
import { cloudCommand } from './cloud.ts';
import { clusterCommand } from './cluster.ts';
import { demoCommand } from './demo.ts';
import { edgeCommand } from './edge.ts';
import { emulateCommand } from './emulate.ts';
import { evalCommand } from './eval.ts';
import { federationCommand } from './federation.ts';
import { exportCommand } from './export.ts';
import { generateCommand } from './generate.ts';
import { processIo, type CommandIo } from './io.ts';
import { keysCommand } from './keys.ts';
import { trainCommand } from './train.ts';
import { isTandemError } from '../common/define-errors.ts';

/** The commands of `tandem`, in the order `--help` lists them. */
function program(io: CommandIo): Command {
  const root = new Command('tandem')
    .description('Split and offsite fine-tuning of LLMs across a cloud and the machines that own the data')
    .showHelpAfterError()
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.log(s.trimEnd()) });
  for (const command of [generateCommand(io), trainCommand(io), evalCommand(io), exportCommand(io), cloudCommand(io), clusterCommand(io), keysCommand(io), federationCommand(io), emulateCommand(io), edgeCommand(io), auditCommand(io), demoCommand(io)]) root.addCommand(command);
  const configure = (c: Command): void => {
    c.configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.log(s.trimEnd()) });
    c.commands.forEach(configure);
  };
  root.commands.forEach(configure);
  return root;
}

/**
 * Runs the `tandem` command line and returns the exit code: 0 done, 1 failed, 2 bad usage
 * or bad input (a flag, a file, the network), with the error's stable code on stderr.
 */
export async function main(argv: string[], io: CommandIo = processIo): Promise<number> {
  const root = program(io);
  const override = (c: Command): void => {
    c.exitOverride();
    c.commands.forEach(override);
  };
  override(root);
  try {
    await root.parseAsync(argv, { from: 'user' });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    if (isTandemError(err)) {
      io.log(`error: ${err.describe()}`);
      return 2;
    }
    io.log(`error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    return 1;
  }
}
