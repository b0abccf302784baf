// The served model, shared by the plugins and the data plane; each plugin gets it (and only
// what else it needs) as its options.
import { CloudError } from './errors.ts';
import type { MiddleRunner } from './middle-runner.ts';
import type { ServedModel } from './served-model.ts';

/** The served model once loaded; routes and the data plane answer TANDEM_MODEL_NOT_READY before. */
export class ModelSlot {
  #value: { served: ServedModel; executor: MiddleRunner } | undefined;

  /** Loaded, and every compute worker is up (not while one restarts). */
  get ready(): boolean {
    return this.#value !== undefined && this.#value.executor.ready;
  }

  get loaded(): boolean {
    return this.#value !== undefined;
  }

  set(served: ServedModel, executor: MiddleRunner): void {
    this.#value = { served, executor };
  }

  get(): { served: ServedModel; executor: MiddleRunner } {
    if (this.#value === undefined) throw new CloudError('TANDEM_MODEL_NOT_READY');
    return this.#value;
  }

  served(): ServedModel {
    return this.get().served;
  }

  /** The model with this id; TANDEM_MODEL_UNKNOWN otherwise. */
  byId(id: string): ServedModel {
    const served = this.served();
    if (served.id !== id) throw new CloudError('TANDEM_MODEL_UNKNOWN', { model: JSON.stringify(id), served: served.id });
    return served;
  }
}
