import { ModelError } from '../errors.ts';
import type { PeftMethod } from './method.ts';

/** The PEFT methods an adapter may use, by name. Unknown and duplicate names are typed errors. */
export class MethodRegistry {
  private readonly methods = new Map<string, PeftMethod>();

  constructor(methods: readonly PeftMethod[] = []) {
    for (const m of methods) this.register(m);
  }

  register(method: PeftMethod): void {
    if (this.methods.has(method.name)) {
      throw new ModelError('TANDEM_PEFT_METHOD_DUPLICATE', `a PEFT method named ${JSON.stringify(method.name)} is already registered; choose another name`, { field: 'method' });
    }
    this.methods.set(method.name, method);
  }

  get(name: string): PeftMethod {
    const m = this.methods.get(name);
    if (!m) throw new ModelError('TANDEM_PEFT_METHOD_UNKNOWN', `unknown PEFT method ${JSON.stringify(name)}; known methods are ${this.names().join(', ')}`, { field: 'method' });
    return m;
  }

  has(name: string): boolean {
    return this.methods.has(name);
  }

  names(): string[] {
    return [...this.methods.keys()];
  }

  /** The method that reads a single-method adapter_config.json of this peft_type: the first registered with it. */
  forPeftType(peftType: string, file?: string): PeftMethod {
    for (const m of this.methods.values()) if (m.peftType === peftType) return m;
    const known = [...new Set([...this.methods.values()].map((m) => m.peftType))];
    throw new ModelError('TANDEM_PEFT_METHOD_UNKNOWN', `peft_type ${JSON.stringify(peftType)} is not supported; supported are ${known.join(', ')}, TANDEM`, { file, field: 'peft_type' });
  }
}
