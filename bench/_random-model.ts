// The benches' ~25M-parameter random Llama (hidden 512, MLP 1536, 8 heads / 4 KV heads, vocab
// 512 with stories260K's tokenizer, seed 11), saved as a Hugging Face folder: one definition,
// so that split, serving, multitenant and cluster measure the same model.
import { join } from 'node:path';
import { parseModelConfig, saveModelFolder } from '../model/index.ts';
import { randomWeights } from '../model/testing.ts';

const FIXTURE = join(import.meta.dirname, '..', 'test', 'fixtures', 'stories260K');

/** The model's folder under `work` (8 blocks unless `layers` says; ~25M parameters at 8). */
export async function randomModelDir(work: string, layers = 8): Promise<string> {
  const rawConfig = {
    architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 512, intermediate_size: 1536, num_hidden_layers: layers,
    num_attention_heads: 8, num_key_value_heads: 4, vocab_size: 512, max_position_embeddings: 1024, rms_norm_eps: 1e-5, rope_theta: 10000,
    hidden_act: 'silu', tie_word_embeddings: true, bos_token_id: 1, eos_token_id: 2, torch_dtype: 'float32',
  };
  const dir = join(work, 'random-llama');
  await saveModelFolder(dir, rawConfig, randomWeights(parseModelConfig(rawConfig), 11), {
    copyFiles: [join(FIXTURE, 'tokenizer.json'), join(FIXTURE, 'tokenizer_config.json')],
  });
  return dir;
}
