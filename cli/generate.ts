import { Command } from 'commander';
import { generate, generateOrt, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, ModelError, OrtLlama, parseEngineName, selectEngine } from '../model/index.ts';
import type { GenerateResult, LoadedModel, WeightArrays } from '../model/index.ts';
import { numberFlag, requiredFlag } from './flags.ts';
import type { CommandIo } from './io.ts';

interface GenerateFlags {
  model?: string;
  adapter?: string;
  prompt?: string;
  maxNewTokens?: string;
  temperature?: string;
  topP?: string;
  seed?: string;
  json?: boolean;
  backend?: string;
  engine?: string;
}

/** The base weights with the adapter merged in, or undefined when a method of it cannot merge. */
async function mergedWeights(loaded: LoadedModel, adapterDir: string): Promise<WeightArrays | undefined> {
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  try {
    const adapter = await loadAdapter(model, adapterDir);
    try {
      adapter.merge();
      const out = new Map<string, { shape: number[]; data: Float32Array }>();
      for (const [name, w] of loaded.weights) out.set(name, { shape: w.shape, data: Float32Array.from(model.weight(name).dataSync() as Float32Array) });
      return out;
    } catch (err) {
      if (err instanceof ModelError && err.code === 'TANDEM_MERGE_UNSUPPORTED') return undefined;
      throw err;
    } finally {
      adapter.dispose();
    }
  } finally {
    model.dispose();
  }
}

export function generateCommand(io: CommandIo): Command {
  return new Command('generate')
    .description('generate text from a Hugging Face model folder')
    .option('--model <dir>', 'Hugging Face model folder (config.json, model.safetensors, tokenizer.json)')
    .option('--adapter <dir>', 'a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) to apply')
    .option('--prompt <text>', 'the prompt', '')
    .option('--max-new-tokens <n>', 'tokens to generate', '64')
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', '1')
    .option('--top-p <p>', 'nucleus sampling mass', '1')
    .option('--seed <s>', 'sampling seed', '0')
    .option('--json', 'print one JSON object: input_ids, generated_ids, text, top_logits')
    .option('--backend <name>', 'compute backend: auto, tensorflow-gpu, tensorflow, wasm, cpu')
    .option('--engine <name>', 'ort-cpu or ort-cuda: run the model on ONNX Runtime (an adapter is merged into the weights; one that cannot merge runs on tfjs); default TANDEM_ENGINE unless --backend is given')
    .action(async (flags: GenerateFlags) => {
      const dir = requiredFlag('--model', flags.model);
      const maxNewTokens = numberFlag('--max-new-tokens', flags.maxNewTokens, { min: 0, integer: true });
      const temperature = numberFlag('--temperature', flags.temperature, { min: 0 });
      const topP = numberFlag('--top-p', flags.topP, { min: Number.MIN_VALUE, max: 1 });
      const seed = numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true });
      const engineName = parseEngineName(flags.engine ?? (flags.backend === undefined ? process.env.TANDEM_ENGINE : undefined), flags.engine !== undefined ? '--engine' : 'TANDEM_ENGINE');
      const log = flags.json ? undefined : io.log;
      const chosen = engineName !== undefined ? await selectEngine({ engine: engineName, log }) : undefined;
      const ort = chosen?.ortProvider !== undefined ? chosen : undefined;
      if (chosen === undefined) await initBackend({ backend: flags.backend, log });
      const [loaded, tokenizer] = await Promise.all([loadModelFolder(dir), loadTokenizer(dir)]);
      const inputIds = tokenizer.encode(flags.prompt ?? '');
      const options = { maxNewTokens, temperature, topP, seed };
      let result: GenerateResult | undefined;
      if (ort !== undefined) {
        const weights = flags.adapter ? await mergedWeights(loaded, flags.adapter) : loaded.weights;
        if (weights === undefined) log?.('the adapter cannot be merged into the weights: generating on tfjs');
        else {
          const engine = await OrtLlama.create(loaded.config, weights, { threads: ort.threads, provider: ort.ortProvider });
          try {
            result = await generateOrt(engine, inputIds, options);
          } finally {
            await engine.dispose();
          }
        }
      }
      if (result === undefined) {
        const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
        try {
          const adapter = flags.adapter ? await loadAdapter(model, flags.adapter) : undefined;
          result = generate(model, inputIds, { ...options, hooks: adapter?.hooks });
        } finally {
          model.dispose();
        }
      }
      const text = tokenizer.decode([...inputIds, ...result.generatedIds], { skipSpecialTokens: true });
      if (flags.json) {
        io.out(JSON.stringify({ input_ids: inputIds, generated_ids: result.generatedIds, text, top_logits: result.topLogits }));
      } else {
        io.out(text);
      }
    });
}
