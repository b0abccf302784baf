// The model families Tandem runs, registered once by model_type.
import { ModelFamilyRegistry } from './family.ts';
import { llamaFamily } from './llama.ts';
import { mistralFamily } from './mistral.ts';
import { qwen2Family } from './qwen2.ts';

export { ModelFamilyRegistry } from './family.ts';
export type { ModelFamily } from './family.ts';

export const MODEL_FAMILIES = new ModelFamilyRegistry([llamaFamily, mistralFamily, qwen2Family]);
