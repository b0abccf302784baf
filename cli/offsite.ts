// `tandem edge offsite` and `tandem edge upload`, mounted under `tandem edge`.
import { Command } from 'commander';
import { OFFSITE_ADAPTER_DIR, trainOffsite, uploadAdapter } from '../edge-client/index.ts';
import type { TrainEvent } from '../model/index.ts';
import { numberFlag, pemFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';
import { addRecipeOptions, recipeFromFlags } from './recipe.ts';
import type { RecipeFlags } from './recipe.ts';
import { describe, methodSpec } from './train.ts';
import type { MethodFlags } from './train.ts';

interface OffsiteFlags extends MethodFlags, RecipeFlags {
  bundle?: string;
  data?: string;
  out?: string;
}

export function offsiteCommand(io: CommandIo = processIo): Command {
  const command = new Command('offsite')
    .description('train adapters against an emulator bundle, with no connection to the cloud; writes OUT/adapter in the full model\'s block numbers for `tandem edge upload`')
    .option('--bundle <dir>', 'emulator bundle (tandem emulate, or downloaded from the cloud)')
    .option('--data <file>', '.jsonl of {"text"}, {"prompt","completion"} or {"text","label"}, or a plain .txt file')
    .option('--method <name>', 'PEFT method: block (Offsite-Tuning\'s adapter), lora, dora, ia3, prompt_tuning, ...', 'block')
    .option('--r <n>', 'LoRA rank')
    .option('--lora-alpha <a>', 'LoRA alpha')
    .option('--lora-dropout <p>', 'LoRA dropout')
    .option('--target-modules <list>', 'comma-separated module names (q_proj,v_proj) or all-linear')
    .option('--layers <list>', "blocks to adapt, in the full model's numbers (default: every bottom and top block)")
    .option('--num-virtual-tokens <n>', 'prompt tuning: virtual tokens')
    .option('--out <dir>', 'output folder: emulated-model/, run/ (checkpoints) and, when done, adapter/');
  return addRecipeOptions(command).action(async (flags: OffsiteFlags) => {
      const report = (e: TrainEvent) => io.out(flags.json ? JSON.stringify(e) : describe(e).replace(/^done: adapter in .*$/, 'done training against the emulator'));
      const result = await trainOffsite({
        bundleDir: requiredFlag('--bundle', flags.bundle),
        dataFile: requiredFlag('--data', flags.data),
        outDir: requiredFlag('--out', flags.out),
        methods: [methodSpec(flags)],
        ...recipeFromFlags(flags),
      }, report);
      if (result.adapterDir === undefined) return;
      const v = result.summary.after;
      if (flags.json) {
        io.out(JSON.stringify({ type: 'offsite', adapterDir: result.adapterDir, baseModel: result.manifest.baseModel, emulatorFineTuned: v ?? null }));
        return;
      }
      io.out(`adapter for ${result.manifest.baseModel.id} (${result.manifest.baseModel.contentHash}) in ${result.adapterDir}${v ? `; emulator fine-tuned: val loss ${v.loss.toFixed(4)}, ppl ${v.perplexity.toFixed(2)}` : ''}`);
      io.out(`send it with: tandem edge upload --cloud URL --key KEY --adapter ${result.adapterDir} --data EVAL_FILE`);
    });
}

interface UploadFlags {
  cloud?: string;
  key?: string;
  ca?: string;
  adapter?: string;
  data?: string;
  model?: string;
  seqLen?: string;
  batchSize?: string;
  json?: boolean;
}

export function uploadCommand(io: CommandIo = processIo): Command {
  return new Command('upload')
    .description('the plug-in evaluation of an offsite adapter in split mode: the adapter and the data stay here, the cloud runs the full middle on hidden states only')
    .option('--cloud <url>', 'the cloud node, http://host:port')
    .option('--key <key>', 'your API key (or TANDEM_KEY)')
    .option('--ca <file>', 'PEM CA certificate an https:// cloud\'s certificate must chain to (a private CA)')
    .option('--adapter <dir>', `the adapter folder \`tandem edge offsite\` wrote (OUT/${OFFSITE_ADAPTER_DIR})`)
    .option('--data <file>', 'evaluation data (.jsonl or plain text); it never leaves this machine')
    .option('--model <id>', "the model's id on the node (default: the one the adapter was trained for)")
    .option('--seq-len <n>', 'tokens per evaluation row')
    .option('--batch-size <n>', 'evaluation rows per batch')
    .option('--json', 'print the evaluation as JSON')
    .action(async (flags: UploadFlags) => {
      const key = flags.key ?? process.env.TANDEM_KEY;
      const result = await uploadAdapter({
        cloudUrl: requiredFlag('--cloud', flags.cloud),
        key: requiredFlag('--key', key),
        ...(flags.ca === undefined ? {} : { ca: (await pemFlag('--ca', flags.ca)).toString('utf8') }),
        adapterDir: requiredFlag('--adapter', flags.adapter),
        dataFile: requiredFlag('--data', flags.data),
        modelId: flags.model,
        ...(flags.seqLen === undefined ? {} : { seqLen: numberFlag('--seq-len', flags.seqLen, { min: 2, integer: true }) }),
        ...(flags.batchSize === undefined ? {} : { batchSize: numberFlag('--batch-size', flags.batchSize, { min: 1, integer: true }) }),
      });
      if (flags.json) return io.out(JSON.stringify(result));
      const acc = (a?: number) => (a === undefined ? '' : `  accuracy ${(100 * a).toFixed(1)}%`);
      io.out(`plug-in evaluation on ${result.model} (${result.examples} examples, ${result.plugIn.tokens} tokens)`);
      io.out(`  full model alone     loss ${result.baseline.loss.toFixed(4)}  ppl ${result.baseline.perplexity.toFixed(2)}${acc(result.baseline.accuracy)}`);
      io.out(`  with the adapter     loss ${result.plugIn.loss.toFixed(4)}  ppl ${result.plugIn.perplexity.toFixed(2)}${acc(result.plugIn.accuracy)}`);
    });
}
