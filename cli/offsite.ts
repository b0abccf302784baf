// `tandem edge offsite` and `tandem edge upload` (the lead mounts both under `tandem edge`).
import { Command } from 'commander';
import { OFFSITE_ADAPTER_DIR, trainOffsite, uploadAdapter } from '../edge-client/index.ts';
import { DEFAULT_RECIPE, SCHEDULES } from '../model/index.ts';
import type { ScheduleKind, TrainEvent } from '../model/index.ts';
import { numberFlag, requiredFlag } from './flags.ts';
import { processIo } from './io.ts';
import type { CommandIo } from './io.ts';
import { choice, describe, methodSpec } from './train.ts';
import type { MethodFlags } from './train.ts';

interface OffsiteFlags extends MethodFlags {
  bundle?: string;
  data?: string;
  out?: string;
  steps?: string;
  batchSize: string;
  gradAccum: string;
  seqLen: string;
  lr: string;
  warmup: string;
  schedule: string;
  weightDecay: string;
  clip: string;
  seed: string;
  valFraction: string;
  evalEvery: string;
  saveEvery: string;
  pack: boolean;
  resume?: boolean;
  json?: boolean;
  backend?: string;
}

export function offsiteCommand(io: CommandIo = processIo): Command {
  return new Command('offsite')
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
    .option('--steps <n>', 'optimizer steps')
    .option('--out <dir>', 'output folder: emulated-model/, run/ (checkpoints) and, when done, adapter/')
    .option('--batch-size <n>', 'rows per micro-batch', String(DEFAULT_RECIPE.batchSize))
    .option('--grad-accum <n>', 'micro-batches per optimizer step', String(DEFAULT_RECIPE.gradAccum))
    .option('--seq-len <n>', 'tokens per row', String(DEFAULT_RECIPE.seqLen))
    .option('--lr <x>', 'peak learning rate', String(DEFAULT_RECIPE.lr))
    .option('--warmup <n>', 'linear warm-up steps', String(DEFAULT_RECIPE.warmup))
    .option('--schedule <kind>', `learning-rate decay after warm-up: ${SCHEDULES.join(', ')}`, DEFAULT_RECIPE.schedule)
    .option('--weight-decay <x>', 'AdamW weight decay', String(DEFAULT_RECIPE.weightDecay))
    .option('--clip <x>', 'clip gradients to this global norm; 0 turns clipping off', String(DEFAULT_RECIPE.clip))
    .option('--seed <n>', 'seed of the split, the shuffles, the adapter and dropout', String(DEFAULT_RECIPE.seed))
    .option('--val-fraction <x>', 'fraction of the data held out for validation', String(DEFAULT_RECIPE.valFraction))
    .option('--eval-every <n>', 'validate on the emulator every n steps (0: only at the end)', '0')
    .option('--save-every <n>', 'checkpoint every n steps (0: only at the end)', '0')
    .option('--no-pack', 'one sequence per row instead of packing short ones together')
    .option('--resume', 'continue the checkpoint in --out exactly')
    .option('--json', 'one JSON object per line per report')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .action(async (flags: OffsiteFlags) => {
      const int = (flag: string, value: string | undefined, min = 0) => numberFlag(flag, value, { min, integer: true });
      const report = (e: TrainEvent) => io.out(flags.json ? JSON.stringify(e) : describe(e).replace(/^done: adapter in .*$/, 'done training against the emulator'));
      const result = await trainOffsite({
        bundleDir: requiredFlag('--bundle', flags.bundle),
        dataFile: requiredFlag('--data', flags.data),
        outDir: requiredFlag('--out', flags.out),
        methods: [methodSpec(flags)],
        steps: int('--steps', flags.steps, 1),
        batchSize: int('--batch-size', flags.batchSize, 1),
        gradAccum: int('--grad-accum', flags.gradAccum, 1),
        seqLen: int('--seq-len', flags.seqLen, 2),
        lr: numberFlag('--lr', flags.lr, { min: Number.MIN_VALUE }),
        warmup: int('--warmup', flags.warmup),
        schedule: choice<ScheduleKind>('--schedule', flags.schedule, SCHEDULES, DEFAULT_RECIPE.schedule),
        optimizer: 'adamw',
        weightDecay: numberFlag('--weight-decay', flags.weightDecay, { min: 0 }),
        momentum: DEFAULT_RECIPE.momentum,
        clip: numberFlag('--clip', flags.clip, { min: 0 }),
        seed: numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true }),
        valFraction: numberFlag('--val-fraction', flags.valFraction, { min: 0, max: 0.99 }),
        evalEvery: int('--eval-every', flags.evalEvery),
        saveEvery: int('--save-every', flags.saveEvery),
        pack: flags.pack,
        resume: flags.resume ?? false,
        backend: flags.backend,
      }, report);
      if (result.adapterDir === undefined) return;
      const v = result.summary.validation;
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
  adapter?: string;
  data?: string;
  model?: string;
  seqLen?: string;
  batchSize?: string;
  json?: boolean;
}

export function uploadCommand(io: CommandIo = processIo): Command {
  return new Command('upload')
    .description('send an offsite adapter to the cloud, which plugs it into the full model and evaluates it on the data sent (and keeps neither)')
    .option('--cloud <url>', 'the cloud node, http://host:port')
    .option('--key <key>', 'your API key (or TANDEM_KEY)')
    .option('--adapter <dir>', `the adapter folder \`tandem edge offsite\` wrote (OUT/${OFFSITE_ADAPTER_DIR})`)
    .option('--data <file>', 'evaluation data (.jsonl or plain text)')
    .option('--model <id>', "the model's id on the node (default: the one the adapter was trained for)")
    .option('--seq-len <n>', 'tokens per evaluation row')
    .option('--batch-size <n>', 'evaluation rows per batch')
    .option('--json', 'print the evaluation as JSON')
    .action(async (flags: UploadFlags) => {
      const key = flags.key ?? process.env.TANDEM_KEY;
      const result = await uploadAdapter({
        cloudUrl: requiredFlag('--cloud', flags.cloud),
        key: requiredFlag('--key', key),
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
