import { Command } from 'commander';
import { DEFAULT_METHODS, edgeGenerate, progressPrinter, trainEdge } from '../edge-client/index.ts';
import type { EdgeTrainResult, MiddleLoraOptions, ProgressMode } from '../edge-client/index.ts';
import { exportAdapter, initBackend, parseDefenses } from '../model/index.ts';
import type { MethodSpec } from '../model/index.ts';
import { CliError } from './errors.ts';
import { ENGINE_FLAG_HELP, engineFlag, numberFlag, pemFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';
import { federateCommand } from './federation.ts';
import { offsiteCommand, uploadCommand } from './offsite.ts';
import { addCodecOptions, addRecipeOptions, choice, codecsFromFlags, recipeFromFlags } from './recipe.ts';
import type { CodecFlags, RecipeFlags } from './recipe.ts';

interface TrainFlags extends RecipeFlags, CodecFlags {
  defense?: string;
  engine?: string;
  cloud?: string;
  key?: string;
  ca?: string;
  model?: string;
  data?: string;
  method: string[];
  bottom?: string;
  top?: string;
  checkpoint?: string;
  out?: string;
  cache?: string;
  progress?: string;
  middleLora?: string;
}

const CODEC_DEFAULTS = { forward: 'f32', backward: 'f32' } as const;

function parseValue(raw: string): unknown {
  if (raw.includes('+')) return raw.split('+');
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

/** The longest --method value: a spec is a few dozen characters; a layer list of a deep model a few hundred. */
export const METHOD_FLAG_MAX_CHARS = 4096;

/** Keys that would reach an object's prototype instead of its own fields, and the name given before the colon. */
const RESERVED_METHOD_KEYS: ReadonlySet<string> = new Set(['__proto__', 'constructor', 'prototype', 'method']);

/** Splits at the commas outside [...] and {...}, in one pass. */
function splitTopLevel(rest: string, bad: (reason: string) => CliError): string[] {
  const parts: string[] = [];
  let depth = 0;
  let from = 0;
  for (let i = 0; i < rest.length; i++) {
    const c = rest[i];
    if (c === '[' || c === '{') depth++;
    else if (c === ']' || c === '}') {
      if (depth === 0) throw bad(`unbalanced ${JSON.stringify(c)} at character ${i}`);
      depth--;
    } else if (c === ',' && depth === 0) {
      parts.push(rest.slice(from, i));
      from = i + 1;
    }
  }
  if (depth !== 0) throw bad('an unclosed [ or {');
  parts.push(rest.slice(from));
  return parts;
}

/** `lora` or `lora:r=16,loraAlpha=32,targetModules=q_proj+v_proj,layersToTransform=[0,4]`. */
export function parseMethodFlag(spec: string): MethodSpec {
  const bad = (reason: string): CliError => new CliError('TANDEM_CLI_FLAG_INVALID', '--method', reason);
  if (spec.length > METHOD_FLAG_MAX_CHARS) throw bad(`is ${spec.length} characters, over the limit of ${METHOD_FLAG_MAX_CHARS}`);
  const colon = spec.indexOf(':');
  const name = colon < 0 ? spec : spec.slice(0, colon);
  const rest = colon < 0 ? '' : spec.slice(colon + 1);
  if (!name) throw bad(`needs a method name, got ${JSON.stringify(spec.slice(0, 40))}`);
  const fields: Record<string, unknown> = {};
  if (rest) {
    for (const pair of splitTopLevel(rest, bad)) {
      const eq = pair.indexOf('=');
      if (eq <= 0) throw bad(`expected key=value, got ${JSON.stringify(pair.slice(0, 40))}`);
      const key = pair.slice(0, eq);
      if (RESERVED_METHOD_KEYS.has(key)) throw bad(`${JSON.stringify(key)} is not a field name`);
      if (Object.hasOwn(fields, key)) throw bad(`${JSON.stringify(key)} is given twice`);
      fields[key] = parseValue(pair.slice(eq + 1));
    }
  }
  return { method: name, ...fields };
}

/** `r=8`, `r=8,alpha=16,targets=q_proj,v_proj`, `method=ia3` (a bare name continues the list of targets). */
export function parseMiddleLoraFlag(spec: string): MiddleLoraOptions {
  const bad = (reason: string): CliError => new CliError('TANDEM_CLI_FLAG_INVALID', '--middle-lora', reason);
  let r: number | undefined;
  let method: 'lora' | 'ia3' | undefined;
  let alpha: number | undefined;
  let targets: string[] | undefined;
  let last = '';
  for (const part of spec.split(',').map((p) => p.trim()).filter((p) => p !== '')) {
    const eq = part.indexOf('=');
    if (eq < 0) {
      if (last !== 'targets' || targets === undefined) throw bad(`expected key=value (r, alpha, targets), got ${JSON.stringify(part.slice(0, 40))}`);
      targets.push(part);
      continue;
    }
    const key = part.slice(0, eq);
    const value = part.slice(eq + 1);
    last = key;
    if (key === 'r') r = numberFlag('--middle-lora r', value, { min: 1, integer: true });
    else if (key === 'alpha') alpha = numberFlag('--middle-lora alpha', value, { min: Number.MIN_VALUE });
    else if (key === 'targets') targets = value.split('+').filter((t) => t !== '');
    else if (key === 'method') {
      if (value !== 'lora' && value !== 'ia3') throw bad(`method is lora or ia3, got ${JSON.stringify(value.slice(0, 40))}`);
      method = value;
    } else throw bad(`unknown key ${JSON.stringify(key.slice(0, 40))}; known: method, r, alpha, targets`);
  }
  if (r === undefined && method !== 'ia3') throw bad('needs r=<rank>');
  return { ...(method === undefined ? {} : { method }), ...(r === undefined ? {} : { r }), ...(alpha === undefined ? {} : { alpha }), ...(targets === undefined ? {} : { targets }) };
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function progressMode(flags: TrainFlags): ProgressMode {
  if (flags.json) return 'json';
  return choice<ProgressMode>('--progress', flags.progress, ['tty', 'plain', 'json'], process.stderr.isTTY ? 'tty' : 'plain');
}

function summary(r: EdgeTrainResult): Record<string, unknown> {
  return {
    model: r.model, contentHash: r.contentHash, cut: r.cut, codecs: r.codecs, steps: r.steps, startStep: r.startStep,
    finalLoss: r.losses.at(-1) ?? null, before: r.before ?? null, after: r.after ?? null, wire: r.wire, trainableParameters: r.trainableParameters, seconds: r.seconds,
  };
}

function trainCommand(io: CommandIo): Command {
  const command = new Command('train')
    .description('fine-tune an adapter on local data with the cloud running the middle of the model')
    .option('--cloud <urls>', 'cloud node URL, e.g. http://127.0.0.1:8080; several gateways of one cluster comma-separated (the next is tried when one is gone)')
    .option('--key <key>', 'API key (or TANDEM_KEY)')
    .option('--ca <file>', 'PEM CA certificate an https:// cloud\'s certificate must chain to (a private CA)')
    .option('--model <id>', 'model id the cloud serves')
    .option('--data <file>', '.jsonl ({"text"}, {"prompt","completion"}, {"text","label"}) or plain text')
    .option('--method <spec>', 'PEFT method, repeatable: name or name:key=value,... (default lora:r=8,loraAlpha=16)', collect, [])
    .option('--bottom <n>', 'blocks kept at the bottom (default: the model\'s default cut)')
    .option('--top <n>', 'blocks kept at the top')
    .option('--checkpoint <dir>', 'checkpoint folder; an existing checkpoint there is resumed')
    .option('--out <dir>', 'write the final adapter here as a PEFT folder')
    .option('--cache <dir>', 'cache of edge parts (default ~/.cache/tandem)')
    .option('--progress <mode>', 'tty, plain or json (default: tty on a terminal)')
    .option('--defense <list>', 'privacy defenses applied before anything leaves: none, auto, or noise[:SIGMA[:CLIP]], deeper-bottom[:K], max-norm, gradient-noise[:RHO], nopeek[:ALPHA], marvell[:S] (see tandem audit)')
    .option('--middle-lora <spec>', 'an adapter on the middle blocks, held and trained by the cloud: r=8[,alpha=16][,targets=q_proj,v_proj] (LoRA) or method=ia3[,targets=k_proj,v_proj,down_proj]; written with the edge\'s parts as one PEFT folder')
    .option('--engine <name>', ENGINE_FLAG_HELP);
  return addRecipeOptions(addCodecOptions(command, CODEC_DEFAULTS)).action(async (flags: TrainFlags) => {
    // Every flag is checked before the backend starts, the edge part downloads or a session opens.
    const cloud = requiredFlag('--cloud', flags.cloud);
    const key = requiredFlag('--key', flags.key ?? process.env.TANDEM_KEY);
    const model = requiredFlag('--model', flags.model);
    const data = requiredFlag('--data', flags.data);
    const ca = flags.ca === undefined ? undefined : (await pemFlag('--ca', flags.ca)).toString('utf8');
    const int = (flag: string, v: string | undefined) => numberFlag(flag, v, { min: 0, integer: true });
    const cut = flags.bottom !== undefined || flags.top !== undefined ? { bottom: int('--bottom', flags.bottom), top: int('--top', flags.top) } : undefined;
    const { resume, backend, ...recipe } = recipeFromFlags(flags);
    const codecs = codecsFromFlags(flags, CODEC_DEFAULTS);
    const methods = flags.method.length > 0 ? flags.method.map(parseMethodFlag) : DEFAULT_METHODS;
    const parsedDefenses = flags.defense === undefined ? undefined : parseDefenses(flags.defense);
    // auto is fitted to the model's blocks and the cut by trainEdge, once the cloud has said them.
    const defenses = parsedDefenses;
    if (resume && flags.checkpoint === undefined) throw new CliError('TANDEM_CLI_FLAG_MISSING', '--checkpoint', 'is required with --resume');
    const mode = progressMode(flags);
    await initBackend({ backend, log: mode === 'json' ? undefined : io.log });
    const result = await trainEdge({
      cloud, key, ca, model, data, cut, methods, ...codecs, ...recipe, engine: engineFlag(flags), ...(mode === 'json' ? {} : { log: io.log }),
      ...(defenses === undefined ? {} : { defenses }),
      ...(flags.middleLora === undefined ? {} : { middleLora: parseMiddleLoraFlag(flags.middleLora) }),
      resume: resume ? true : 'auto',
      checkpointDir: flags.checkpoint,
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
      const { files } = await exportAdapter({ checkpointDir: requiredFlag('--checkpoint', flags.checkpoint), outDir: requiredFlag('--out', flags.out) });
      io.out(`wrote ${files.join(', ')} to ${flags.out}`);
    });
}

interface GenerateFlags {
  cloud?: string;
  key?: string;
  ca?: string;
  model?: string;
  adapter?: string;
  prompt?: string;
  bottom?: string;
  top?: string;
  maxNewTokens?: string;
  temperature?: string;
  topP?: string;
  seed?: string;
  cache?: string;
  backend?: string;
  json?: boolean;
}

/** Split inference: the private adapter and the text stay here; the cloud runs the middle. */
function generateCommand(io: CommandIo): Command {
  return new Command('generate')
    .description('generate with a private adapter: bottom and top blocks here, the middle on the cloud; only hidden states cross')
    .option('--cloud <url>', 'cloud node URL')
    .option('--key <key>', 'API key (or TANDEM_KEY)')
    .option('--ca <file>', 'PEM CA certificate an https:// cloud\'s certificate must chain to')
    .option('--model <id>', 'model id the cloud serves (default: its first)')
    .option('--adapter <dir>', 'PEFT adapter folder, applied on the edge (it must not change the middle blocks)')
    .option('--prompt <text>', 'the prompt', '')
    .option('--bottom <n>', 'blocks kept at the bottom (default: the model\'s default cut)')
    .option('--top <n>', 'blocks kept at the top')
    .option('--max-new-tokens <n>', 'tokens to generate', '64')
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', '1')
    .option('--top-p <p>', 'nucleus sampling mass', '1')
    .option('--seed <s>', 'sampling seed', '0')
    .option('--cache <dir>', 'cache of edge parts (default ~/.cache/tandem)')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .option('--json', 'print one JSON object: input_ids, generated_ids, text')
    .action(async (flags: GenerateFlags) => {
      const cloud = requiredFlag('--cloud', flags.cloud);
      const key = requiredFlag('--key', flags.key ?? process.env.TANDEM_KEY);
      const ca = flags.ca === undefined ? undefined : (await pemFlag('--ca', flags.ca)).toString('utf8');
      const int = (flag: string, v: string | undefined) => numberFlag(flag, v, { min: 0, integer: true });
      const cut = flags.bottom !== undefined || flags.top !== undefined ? { bottom: int('--bottom', flags.bottom), top: int('--top', flags.top) } : undefined;
      const maxNewTokens = int('--max-new-tokens', flags.maxNewTokens);
      const temperature = numberFlag('--temperature', flags.temperature, { min: 0 });
      const topP = numberFlag('--top-p', flags.topP, { min: Number.MIN_VALUE, max: 1 });
      const seed = numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true });
      await initBackend({ backend: flags.backend, log: flags.json ? undefined : io.log });
      const r = await edgeGenerate({ cloud, key, ca, model: flags.model, adapterDir: flags.adapter, prompt: flags.prompt ?? '', cut, maxNewTokens, temperature, topP, seed, cacheDir: flags.cache });
      io.out(flags.json ? JSON.stringify({ input_ids: r.inputIds, generated_ids: r.generatedIds, text: r.text }) : r.text);
    });
}

export function edgeCommand(io: CommandIo): Command {
  const edge = new Command('edge').description('the data owner\'s side of split fine-tuning');
  edge.addCommand(trainCommand(io));
  edge.addCommand(exportCommand(io));
  edge.addCommand(offsiteCommand(io));
  edge.addCommand(uploadCommand(io));
  edge.addCommand(federateCommand(io));
  edge.addCommand(generateCommand(io));
  return edge;
}
