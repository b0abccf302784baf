import { Command } from 'commander';
import { evaluateLocal } from '../model/index.ts';
import { ENGINE_FLAG_HELP, engineFlag, numberFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';

interface EvalFlags {
  model?: string;
  adapter?: string;
  data?: string;
  seqLen?: string;
  batchSize?: string;
  json?: boolean;
  backend?: string;
  engine?: string;
}

export function evalCommand(io: CommandIo = processIo): Command {
  return new Command('eval')
    .description('loss and perplexity of a model (with an adapter) on a data file; accuracy for {"text","label"} data')
    .option('--model <dir>', 'Hugging Face model folder')
    .option('--adapter <dir>', 'PEFT adapter folder (adapter_config.json, adapter_model.safetensors)')
    .option('--data <file>', '.jsonl of {"text"}, {"prompt","completion"} or {"text","label"}, or a plain .txt file')
    .option('--seq-len <n>', 'tokens per row', '256')
    .option('--batch-size <n>', 'rows per batch', '8')
    .option('--json', 'print one JSON object')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .option('--engine <name>', ENGINE_FLAG_HELP)
    .action(async (flags: EvalFlags) => {
      const report = await evaluateLocal({
        modelDir: requiredFlag('--model', flags.model),
        dataFile: requiredFlag('--data', flags.data),
        seqLen: numberFlag('--seq-len', flags.seqLen, { min: 2, integer: true }),
        batchSize: numberFlag('--batch-size', flags.batchSize, { min: 1, integer: true }),
        backend: flags.backend,
        engine: engineFlag(flags),
        ...(flags.json ? {} : { log: io.log }),
        ...(flags.adapter ? { adapterDir: flags.adapter } : {}),
      });
      if (flags.json) {
        io.out(JSON.stringify(report));
        return;
      }
      io.out(`loss ${report.loss.toFixed(4)}  perplexity ${report.perplexity.toFixed(2)}  tokens ${report.tokens}  examples ${report.examples}`);
      if (report.accuracy !== undefined) io.out(`accuracy ${(100 * report.accuracy).toFixed(1)}%`);
    });
}
