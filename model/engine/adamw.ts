// AdamW on plain arrays, for the small LoRA tensors whose gradients the ORT training graph
// returns: the optimizer step stays in JS (a few thousand values per module).
export interface ArrayAdamWOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
}

export class ArrayAdamW {
  private step = 0;
  private readonly moments = new Map<string, { m: Float32Array; v: Float32Array }>();
  private readonly beta1: number;
  private readonly beta2: number;
  private readonly eps: number;
  private readonly weightDecay: number;

  constructor(private readonly options: ArrayAdamWOptions) {
    this.beta1 = options.beta1 ?? 0.9;
    this.beta2 = options.beta2 ?? 0.999;
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? 0.01;
  }

  /** Updates every parameter in place from its gradient (same keys, same lengths). */
  apply(params: ReadonlyMap<string, Float32Array>, grads: ReadonlyMap<string, Float32Array>): void {
    this.step++;
    const { lr } = this.options;
    const c1 = 1 - this.beta1 ** this.step;
    const c2 = 1 - this.beta2 ** this.step;
    for (const [name, p] of params) {
      const g = grads.get(name);
      if (!g) continue;
      if (g.length !== p.length) throw new Error(`gradient of ${name} has ${g.length} values, the parameter ${p.length}`);
      let s = this.moments.get(name);
      if (!s) {
        s = { m: new Float32Array(p.length), v: new Float32Array(p.length) };
        this.moments.set(name, s);
      }
      const { m, v } = s;
      for (let i = 0; i < p.length; i++) {
        m[i] = this.beta1 * m[i] + (1 - this.beta1) * g[i];
        v[i] = this.beta2 * v[i] + (1 - this.beta2) * g[i] * g[i];
        p[i] -= lr * ((m[i] / c1) / (Math.sqrt(v[i] / c2) + this.eps) + this.weightDecay * p[i]);
      }
    }
  }
}
