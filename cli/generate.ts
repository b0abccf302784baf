import { Command } from 'commander';
import { checkTokenizerFits, generate, generateOrt, initBackend, LlamaModel, loadAdapter, loadModelFolder, loadTokenizer, mergedWeightArrays, openEngine } from '../model/index.ts';
import type { GenerateResult, OpenedEngine, WeightArrays } from '../model/index.ts';
import { ENGINE_FLAG_HELP, engineFlag, numberFlag, requiredFlag } from './flags.ts';
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
    .option('--engine <name>', `${ENGINE_FLAG_HELP}; on ONNX Runtime an adapter is merged into the weights, and one that cannot merge runs on tfjs`)
    .action(async (flags: GenerateFlags) => {
      const dir = requiredFlag('--model', flags.model);
      const maxNewTokens = numberFlag('--max-new-tokens', flags.maxNewTokens, { min: 0, integer: true });
      const temperature = numberFlag('--temperature', flags.temperature, { min: 0 });
      const topP = numberFlag('--top-p', flags.topP, { min: Number.MIN_VALUE, max: 1 });
      const seed = numberFlag('--seed', flags.seed, { min: 0, max: 2 ** 32 - 1, integer: true });
      const request = engineFlag(flags);
      const log = flags.json ? undefined : io.log;
      await initBackend({ backend: flags.backend, log });
      const [loaded, tokenizer] = await Promise.all([loadModelFolder(dir), loadTokenizer(dir)]);
      checkTokenizerFits(tokenizer, loaded.config.vocabSize);
      const inputIds = tokenizer.encode(flags.prompt ?? '');
      const options = { maxNewTokens, temperature, topP, seed };
      const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
      let opened: OpenedEngine | undefined;
      let result: GenerateResult;
      try {
        const adapter = flags.adapter ? await loadAdapter(model, flags.adapter) : undefined;
        try {
          // The adapter is merged only once ONNX Runtime is chosen; tfjs runs it through its hooks.
          let unmergeable: string | undefined;
          const weights = (): WeightArrays => {
            const merged = adapter ? mergedWeightArrays(model, adapter) : { weights: loaded.weights };
            unmergeable = merged.reason;
            return merged.weights ?? loaded.weights;
          };
          opened = await openEngine(loaded.config, weights, request, log);
          if (opened.engine && unmergeable !== undefined) log?.(`generating on tfjs: the adapter cannot merge into the weights (${unmergeable})`);
          result = opened.engine && unmergeable === undefined
            ? await generateOrt(opened.engine, inputIds, options)
            : generate(model, inputIds, { ...options, hooks: adapter?.hooks });
        } finally {
          adapter?.dispose();
        }
      } finally {
        await opened?.close();
        model.dispose();
      }
      const text = tokenizer.decode([...inputIds, ...result.generatedIds], { skipSpecialTokens: true, skipOutOfVocabulary: true });
      if (flags.json) {
        io.out(JSON.stringify({ input_ids: inputIds, generated_ids: result.generatedIds, text, top_logits: result.topLogits }));
      } else {
        io.out(text);
      }
    });
}
