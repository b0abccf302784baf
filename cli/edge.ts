import { Command } from 'commander';
import { DEFAULT_METHODS, exportAdapter, progressPrinter, trainEdge } from '../edge-client/index.ts';
import type { EdgeTrainResult, ProgressMode } from '../edge-client/index.ts';
import { initBackend } from '../model/index.ts';
import type { MethodSpec } from '../model/index.ts';
import { CliError } from './errors.ts';
import { numberFlag, pemFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { offsiteCommand, uploadCommand } from './offsite.ts';

interface TrainFlags {
  cloud?: string;
  key?: string;
  ca?: string;
  model?: string;
  data?: string;
  method: string[];
  codecForward?: string;
  codecBackward?: string;
  bottom?: string;
  top?: string;
  steps?: string;
  batchSize?: string;
  microbatches?: string;
  seqLen?: string;
  lr?: string;
  warmup?: string;
  schedule?: string;
  optimizer?: string;
  seed?: string;
  valFraction?: string;
  evalEvery?: string;
  checkpoint?: string;
  checkpointEvery?: string;
  out?: string;
  cache?: string;
  json?: boolean;
  progress?: string;
  backend?: string;
}

function parseValue(raw: string): unknown {
  if (raw.includes('+')) return raw.split('+');
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

/** `lora` or `lora:r=16,loraAlpha=32,targetModules=q_proj+v_proj,layersToTransform=[0,4]`. */
export function parseMethodFlag(spec: string): MethodSpec {
  const [name, rest] = spec.split(/:(.*)/s, 2);
  if (!name) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--method', `needs a method name, got ${JSON.stringify(spec)}`);
  const out: MethodSpec = { method: name };
  if (rest) {
    for (const pair of rest.split(/,(?![^[]*\])/)) {
      const eq = pair.indexOf('=');
      if (eq <= 0) throw new CliError('TANDEM_CLI_FLAG_INVALID', '--method', `expected key=value, got ${JSON.stringify(pair)}`);
      out[pair.slice(0, eq)] = parseValue(pair.slice(eq + 1));
    }
  }
  return out;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function progressMode(flags: TrainFlags): ProgressMode {
  if (flags.json) return 'json';
  const p = flags.progress ?? (process.stderr.isTTY ? 'tty' : 'plain');
  if (p !== 'tty' && p !== 'plain' && p !== 'json') throw new CliError('TANDEM_CLI_FLAG_INVALID', '--progress', `must be tty, plain or json, got ${JSON.stringify(p)}`);
  return p;
}

function summary(r: EdgeTrainResult): Record<string, unknown> {
  return {
    model: r.model, contentHash: r.contentHash, cut: r.cut, codecs: r.codecs, steps: r.steps, startStep: r.startStep,
    finalLoss: r.losses.at(-1) ?? null, before: r.before ?? null, after: r.after ?? null, wire: r.wire, trainableParameters: r.trainableParameters, seconds: r.seconds,
  };
}

function trainCommand(io: CommandIo): Command {
  return new Command('train')
    .description('fine-tune an adapter on local data with the cloud running the middle of the model')
    .option('--cloud <url>', 'cloud node URL, e.g. http://127.0.0.1:8080')
    .option('--key <key>', 'API key (or TANDEM_KEY)')
    .option('--ca <file>', 'PEM CA certificate an https:// cloud\'s certificate must chain to (a private CA)')
    .option('--model <id>', 'model id the cloud serves')
    .option('--data <file>', '.jsonl ({"text"}, {"prompt","completion"}, {"text","label"}) or plain text')
    .option('--method <spec>', 'PEFT method, repeatable: name or name:key=value,... (default lora:r=8,loraAlpha=16)', collect, [])
    .option('--codec-forward <codec>', 'activation codec: f32, f16, bf16, int8-block, int4-block, topk', 'f32')
    .option('--codec-backward <codec>', 'gradient codec (lossy ones use error feedback)', 'f32')
    .option('--bottom <n>', 'blocks kept at the bottom (default: the model\'s default cut)')
    .option('--top <n>', 'blocks kept at the top')
    .option('--steps <n>', 'optimizer steps', '100')
    .option('--batch-size <n>', 'rows per micro-batch', '8')
    .option('--microbatches <n>', 'micro-batches per step (pipelined)', '1')
    .option('--seq-len <n>', 'tokens per row', '128')
    .option('--lr <x>', 'peak learning rate', '1e-3')
    .option('--warmup <n>', 'warm-up steps', '0')
    .option('--schedule <kind>', 'cosine, linear or constant', 'constant')
    .option('--optimizer <kind>', 'adamw or sgd', 'adamw')
    .option('--seed <n>', 'seed of data order, adapter init and dropout', '0')
    .option('--val-fraction <x>', 'fraction of records held out for validation', '0.1')
    .option('--eval-every <n>', 'evaluate every n steps (0: only before and after)', '0')
    .option('--checkpoint <dir>', 'checkpoint folder; an existing checkpoint there is resumed')
    .option('--checkpoint-every <n>', 'steps between checkpoints', '50')
    .option('--out <dir>', 'write the final adapter here as a PEFT folder')
    .option('--cache <dir>', 'cache of edge parts (default ~/.cache/tandem)')
    .option('--progress <mode>', 'tty, plain or json (default: tty on a terminal)')
    .option('--json', 'JSON lines of progress on stderr and one JSON summary on stdout')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .action(async (flags: TrainFlags) => {
      const cloud = requiredFlag('--cloud', flags.cloud);
      const key = requiredFlag('--key', flags.key ?? process.env.TANDEM_KEY);
      const model = requiredFlag('--model', flags.model);
      const data = requiredFlag('--data', flags.data);
      const ca = flags.ca === undefined ? undefined : (await pemFlag('--ca', flags.ca)).toString('utf8');
      const int = (flag: string, v: string | undefined, min = 0) => numberFlag(flag, v, { min, integer: true });
      const cut = flags.bottom !== undefined || flags.top !== undefined ? { bottom: int('--bottom', flags.bottom), top: int('--top', flags.top) } : undefined;
      const schedule = flags.schedule as 'cosine' | 'linear' | 'constant';
      const optimizer = flags.optimizer as 'adamw' | 'sgd';
      const mode = progressMode(flags);
      await initBackend({ backend: flags.backend, log: mode === 'json' ? undefined : io.log });
      const result = await trainEdge({
        cloud, key, ca, model, data, cut,
        methods: flags.method.length > 0 ? flags.method.map(parseMethodFlag) : DEFAULT_METHODS,
        codecForward: flags.codecForward as never,
        codecBackward: flags.codecBackward as never,
        steps: int('--steps', flags.steps, 1),
        batchSize: int('--batch-size', flags.batchSize, 1),
        microbatches: int('--microbatches', flags.microbatches, 1),
        seqLen: int('--seq-len', flags.seqLen, 2),
        lr: numberFlag('--lr', flags.lr, { min: Number.MIN_VALUE }),
        warmupSteps: int('--warmup', flags.warmup),
        schedule,
        optimizer,
        seed: numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true }),
        valFraction: numberFlag('--val-fraction', flags.valFraction, { min: 0, max: 0.9 }),
        evalEvery: int('--eval-every', flags.evalEvery),
        checkpointDir: flags.checkpoint,
        checkpointEvery: int('--checkpoint-every', flags.checkpointEvery, 1),
        out: flags.out,
        cacheDir: flags.cache,
        onEvent: progressPrinter(mode, { write: (s) => process.stderr.write(s) }),
      });
      if (flags.json) io.out(JSON.stringify(summary(result)));
      else io.out(`done: ${result.steps} steps, final loss ${(result.losses.at(-1) ?? Number.NaN).toFixed(4)}${flags.out ? `, adapter in ${flags.out}` : ''}`);
    });
}

function exportCommand(io: CommandIo): Command {
  return new Command('export')
    .description('write the adapter of a training checkpoint as a Hugging Face PEFT folder')
    .option('--checkpoint <dir>', 'checkpoint folder written by `tandem edge train --checkpoint`')
    .option('--out <dir>', 'the PEFT folder to write (adapter_config.json, adapter_model.safetensors)')
    .action(async (flags: { checkpoint?: string; out?: string }) => {
      const files = await exportAdapter(requiredFlag('--checkpoint', flags.checkpoint), requiredFlag('--out', flags.out));
      io.out(`wrote ${files.join(', ')} to ${flags.out}`);
    });
}

export function edgeCommand(io: CommandIo): Command {
  const edge = new Command('edge').description('the data owner\'s side of split fine-tuning');
  edge.addCommand(trainCommand(io));
  edge.addCommand(exportCommand(io));
  edge.addCommand(offsiteCommand(io));
  edge.addCommand(uploadCommand(io));
  return edge;
}
