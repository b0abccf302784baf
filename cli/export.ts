import { Command } from 'commander';
import { exportAdapter } from '../model/index.ts';
import { requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';

interface ExportFlags {
  model?: string;
  adapter?: string;
  out?: string;
  merged?: boolean;
  backend?: string;
}

export function exportCommand(io: CommandIo = processIo): Command {
  return new Command('export')
    .description('write a trained adapter as a PEFT folder, or merged into the model as a Hugging Face folder')
    .option('--model <dir>', 'Hugging Face model folder the adapter was trained on')
    .option('--adapter <dir>', 'PEFT adapter folder')
    .option('--out <dir>', 'folder to write')
    .option('--merged', 'fold the adapter into the weights and write a Hugging Face model folder')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .action(async (flags: ExportFlags) => {
      const result = await exportAdapter({
        modelDir: requiredFlag('--model', flags.model),
        adapterDir: requiredFlag('--adapter', flags.adapter),
        outDir: requiredFlag('--out', flags.out),
        merged: flags.merged ?? false,
        backend: flags.backend,
      });
      io.out(`${result.kind === 'merged' ? 'merged model' : 'PEFT adapter'} written to ${result.outDir}`);
    });
}
