// A model family: one Hugging Face `model_type` and what config.json means for it. Families
// differ only in how they read a few config.json keys; the forward pass (model/llama) is
// shared by the LLaMA family. A family joins by one entry in families/index.ts, as
// transformers and Petals register model types.
import { ModelError } from '../errors.ts';

export interface ModelFamily {
  /** config.json's model_type. */
  readonly modelType: string;
  /** The transformers class, for messages and documentation. */
  readonly architecture: string;
  /** Whether q, k and v carry a bias, from config.json. */
  attentionBias(raw: Readonly<Record<string, unknown>>): boolean;
}

/** Families by model_type; a duplicate or an unknown model_type is a typed error. */
export class ModelFamilyRegistry {
  readonly #families = new Map<string, ModelFamily>();

  constructor(families: readonly ModelFamily[] = []) {
    for (const f of families) this.register(f);
  }

  register(family: ModelFamily): void {
    if (this.#families.has(family.modelType)) {
      throw new ModelError('TANDEM_MODEL_FAMILY_DUPLICATE', `model_type ${JSON.stringify(family.modelType)} is registered twice`, { field: 'model_type' });
    }
    this.#families.set(family.modelType, family);
  }

  /** The family of a model_type read from config.json; anything else is TANDEM_MODEL_TYPE_UNSUPPORTED naming the supported ones. */
  get(modelType: unknown, file = 'config.json'): ModelFamily {
    const family = typeof modelType === 'string' ? this.#families.get(modelType) : undefined;
    if (!family) {
      throw new ModelError('TANDEM_MODEL_TYPE_UNSUPPORTED', `model_type ${JSON.stringify(modelType)} is not supported; supported: ${this.modelTypes().join(', ')}`, {
        file,
        field: 'model_type',
      });
    }
    return family;
  }

  modelTypes(): string[] {
    return [...this.#families.keys()];
  }
}
