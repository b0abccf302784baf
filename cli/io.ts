/** Where a command writes: stdout for results, stderr for logs. Tests pass their own. */
export interface CommandIo {
  out(line: string): void;
  log(line: string): void;
}

export const processIo: CommandIo = {
  out: (line) => process.stdout.write(`${line}\n`),
  log: (line) => process.stderr.write(`${line}\n`),
};
