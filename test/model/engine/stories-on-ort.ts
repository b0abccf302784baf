// The fixture the engine tests share: stories260K loaded, tfjs on its cpu backend, and an
// ONNX Runtime engine over the same weights with one thread.
import { OrtLlama } from '../../../model/engine/index.ts';
import { loadModelFolder } from '../../../model/index.ts';
import type { LoadedModel } from '../../../model/index.ts';
import { useBackend } from '../../../model/testing.ts';
import { STORIES_DIR } from '../helpers.ts';

export async function storiesOnOrt(): Promise<{ loaded: LoadedModel; engine: OrtLlama }> {
  await useBackend('cpu');
  const loaded = await loadModelFolder(STORIES_DIR);
  return { loaded, engine: await OrtLlama.create(loaded.config, loaded.weights, { threads: 1 }) };
}
