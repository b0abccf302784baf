// Test adapters for the serving tests: LoRAs with random non-zero A and B on stories260K,
// written as PEFT folders, each with different targets and rank.
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { createAdapter, initBackend, LlamaModel, loadModelFolder, saveAdapter } from '../../model/index.ts';
import { STORIES_DIR } from './helpers.ts';

const SPECS = [
  { r: 2, targetModules: ['q_proj', 'v_proj'] },
  { r: 4, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
  { r: 3, targetModules: ['gate_proj', 'up_proj', 'down_proj'] },
  { r: 2, targetModules: ['q_proj', 'v_proj', 'down_proj'] },
  { r: 4, targetModules: ['v_proj', 'o_proj'] },
  { r: 2, targetModules: ['k_proj', 'up_proj'] },
  { r: 3, targetModules: ['q_proj', 'gate_proj'] },
  { r: 2, targetModules: ['o_proj', 'down_proj'] },
];

/** Writes `count` (at most 8) adapter folders under `dir`, named a0, a1, ...; returns their paths. */
export async function writeTestAdapters(dir: string, count: number): Promise<string[]> {
  await initBackend({ backend: 'wasm' });
  const loaded = await loadModelFolder(STORIES_DIR);
  const model = LlamaModel.fromArrays(loaded.config, loaded.weights);
  const out: string[] = [];
  try {
    for (let i = 0; i < count; i++) {
      // lora_alpha large enough that the adapters change the greedy tokens.
      const adapter = createAdapter(model, [{ method: 'lora', loraAlpha: 64, initLoraWeights: false, ...SPECS[i] }], { seed: 11 + i });
      const path = join(dir, `a${i}`);
      await mkdir(path, { recursive: true });
      await saveAdapter(adapter, path, { baseModel: 'stories260K' });
      adapter.dispose();
      out.push(path);
    }
  } finally {
    model.dispose();
  }
  return out;
}
